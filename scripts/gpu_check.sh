#!/usr/bin/env bash
# The GPU check, on the GPU machine, offline, in one command of at most 9 minutes (docs/gpu_check.md):
#   1. installs the wheels of scripts/gpu_bundle.sh over the image's own torch and transformers
#      (pip --no-index --no-deps --target), and checks every bundled requirement is met (scripts/bundle_check.py);
#   2. the CUDA-only tests (tests/cuda: pinned offload ordering, LOMO in FSDP2's post-reduce hooks, AdaLomo's
#      statistics with parameter offload, the allocator peak against `estimate`);
#   3. the benchmark (benchmarks/gpu_check.py).
# Writes OUT/gpu.txt, OUT/install.txt, OUT/tests.txt, OUT/benchmark.txt and OUT/gpu_check.md (the table for docs/).
#
#   scripts/gpu_check.sh [BUNDLE] [OUT]          # defaults: gpu_bundle/ and gpu_check/
#
# Each phase has its own time limit (TESTS_S, BENCH_S), so a slow phase leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-gpu_bundle}
OUT=${2:-gpu_check}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/lisa_dist_site}
TESTS_S=${TESTS_S:-300}
BENCH_S=${BENCH_S:-210}
mkdir -p "$OUT"
start=$(date +%s)
[ -n "$(ls "$BUNDLE"/*.whl 2>/dev/null)" ] || { echo "gpu_check: no wheels in $BUNDLE (run scripts/gpu_bundle.sh here first)"; exit 2; }
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$BUNDLE"/*.whl \
  > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
# The source tree first (the tests, the benchmark and the lisa_dist they test), then the bundle over the image.
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
"$PY" scripts/bundle_check.py "$BUNDLE" 2>&1 | tee -a "$OUT/install.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device',
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none: no CUDA device')"
  git log -1 --format='commit %H %cd' 2>/dev/null
} > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
timeout "$TESTS_S" "$PY" -m pytest -q tests/cuda -p no:cacheprovider -n 0 -rs 2>&1 | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}
timeout "$BENCH_S" "$PY" -m benchmarks.gpu_check --out "$OUT" 2>&1 | tee "$OUT/benchmark.txt"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench (124: over its time limit), $(( $(date +%s) - start )) s" \
  | tee -a "$OUT/gpu.txt"
exit $(( tests || bench ))
