#!/usr/bin/env bash
# The wheels the GPU machine's image lacks, for an offline install there by scripts/gpu_check.sh: lisa_dist
# itself, DeepSpeed (an sdist on PyPI, built here into a pure-Python wheel; its kernels compile where used),
# datasets, and what those need beyond the image's own packages. For CPython 3.12 on manylinux x86_64, at the
# versions of requirements/lock.txt. Run here, where the registry is reachable:
#
#   scripts/gpu_bundle.sh [OUT]        # OUT defaults to gpu_bundle/ (git-ignored); a few MiB, at most 64
#
# The image (the device tool's KINDS.md) has torch 2.11.0+cu130, transformers 5.17.0, accelerate 1.15.0,
# numpy, pandas, pyarrow, psutil, einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py, fsspec, xxhash, pyyaml,
# jinja2, tqdm, matplotlib, safetensors, pytest and pytest-xdist; it has no DeepSpeed, no datasets, and no network.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_bundle}
PY=${PYTHON:-.venv/bin/python}  # builds the two local wheels; DeepSpeed's setup imports torch
LIMIT_MIB=64
# What the image lacks: DeepSpeed's hjson and pydantic (with its parts), datasets' dill and multiprocess, and a
# typing_extensions new enough for that pydantic.
MISSING=(deepspeed hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions datasets dill
         multiprocess)

pin() {  # NAME: its NAME==VERSION line in the lock, names compared as pip normalizes them
  awk -F'==' -v want="$1" 'function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); return s }
    !/^#/ && norm($1) == norm(want) { print; found = 1 } END { exit !found }' requirements/lock.txt \
    || { echo "gpu_bundle: $1 is not in requirements/lock.txt" >&2; return 1; }
}

rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -m pip wheel -q --no-deps -w "$OUT" .
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$(pin deepspeed)"
binaries=()
for name in "${MISSING[@]}"; do [ "$name" = deepspeed ] || binaries+=("$(pin "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" "${binaries[@]}"
bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
ls -1 "$OUT"
echo "gpu_bundle: $(ls "$OUT"/*.whl | wc -l) wheels, $(( bytes / 1024 )) KiB in $OUT"
[ "$bytes" -le $(( LIMIT_MIB * 1024 * 1024 )) ] || { echo "gpu_bundle: over $LIMIT_MIB MiB" >&2; exit 1; }
