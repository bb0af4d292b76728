#!/usr/bin/env bash
# Step time and peak of each memory lever on 2 CPU ranks (docs/estimate.md, "what each lever costs").
# Preset `small` at 512 tokens (2 MiB layer inputs: above the activation-offload threshold), LISA + AdamW,
# bf16, activation checkpointing. Usage: scripts/lever_cost.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/lever_cost}
common=(model.path=null model.preset=small model.activation_checkpointing=true data.seq_len=512
        train.global_batch_size=4 train.micro_batch_size=2 lisa.interval=5 max_steps=8 save_every=0 progress_bar=false)
declare -A levers=(
  [0_baseline]=""
  [1_bf16_reduce]="train.reduce_dtype=param"
  [2_loss_chunks]="train.loss_chunk_tokens=128"
  [3_split_layers]="engine.split_layers=true"
  [4_activation_offload]="model.activation_offload=true"
  [5_optimizer_offload]="optim.offload_state=true"
  [6_all]="train.reduce_dtype=param engine.split_layers=true model.activation_offload=true optim.offload_state=true"
)
runs=()
for name in $(printf '%s\n' "${!levers[@]}" | sort); do
  rm -rf "$out/$name"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 --master_port $((20000 + RANDOM % 20000)) -m lisa_dist train \
    configs/tiny.yaml "${common[@]}" ${levers[$name]} output_dir="$out/$name" >/dev/null 2>&1
  runs+=("$out/$name")
done
.venv/bin/python scripts/summarize_runs.py --skip 1 "${runs[@]}"
