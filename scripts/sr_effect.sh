#!/usr/bin/env bash
# Stochastic rounding vs round-to-nearest for LOMO with bf16 weights, against an fp32 run (docs/lomo.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/sr}
for lr in 0.001 0.003; do
  for variant in "fp32 false" "bf16 false" "bf16 true"; do
    set -- $variant
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 --master_port $((20000 + RANDOM % 20000)) -m lisa_dist train configs/tiny.yaml \
      method=full optim.name=lomo train.dtype=$1 optim.stochastic_rounding=$2 optim.lr=$lr optim.max_grad_norm=0 \
      train.micro_batch_size=8 max_steps=60 save_every=0 progress_bar=false output_dir=$out/lr${lr}_$1_sr$2 >/dev/null 2>&1
  done
done
.venv/bin/python scripts/sr_effect_table.py "$out"
