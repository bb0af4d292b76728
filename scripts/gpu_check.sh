#!/usr/bin/env bash
# The GPU check, on one GPU, in about 8 minutes: the CUDA-only tests (tests/cuda: pinned offload ordering,
# LOMO in FSDP2's post-reduce hooks, AdaLomo's statistics with parameter offload, the allocator peak
# against `estimate`), then the benchmark of benchmarks/gpu_check.py. Writes OUT/gpu.txt, OUT/tests.txt and
# OUT/gpu_check.md (a markdown table for docs/).
#
#   scripts/gpu_check.sh [OUT]          # OUT defaults to gpu_check/
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt"
start=$(date +%s)
"$PY" -m pytest -q tests/cuda -p no:cacheprovider -n 0 -rs 2>&1 | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}
"$PY" -m benchmarks.gpu_check --out "$OUT" 2>&1 | tee "$OUT/benchmark.txt"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench, $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
exit $(( tests || bench ))
