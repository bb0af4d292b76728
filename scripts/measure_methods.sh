#!/usr/bin/env bash
# Per-rank peak memory, optimizer state and step time for each method/optimizer pair on 2 CPU ranks
# (docs/lomo.md, docs/zero3.md). Usage: [ENGINE=fsdp2|zero3] scripts/measure_methods.sh [tiny|small] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-tiny}
engine=${ENGINE:-fsdp2}
out=${2:-runs/methods_${engine}_$model}
case $model in
  tiny) model_args=(); steps=20; data=(train.global_batch_size=16 train.micro_batch_size=8) ;;
  small) model_args=(model.path=null model.preset=small); steps=10; data=(data.seq_len=128 train.global_batch_size=8 train.micro_batch_size=4) ;;
esac
runs=()
for pair in "full adamw 3e-3" "lisa adamw 3e-3" "full lomo 0.3" "full adalomo 0.05" "lisa lomo 0.3" "lisa adalomo 0.05"; do
  set -- $pair
  dir=$out/$1_$2
  rm -rf "$dir"
  OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 --master_port $((20000 + RANDOM % 20000)) -m lisa_dist train configs/tiny.yaml "${model_args[@]}" \
    engine.name=$engine method=$1 optim.name=$2 optim.lr=$3 lisa.interval=5 max_steps=$steps save_every=0 progress_bar=false \
    "${data[@]}" output_dir=$dir >/dev/null 2>&1
  runs+=("$dir")
done
.venv/bin/python scripts/summarize_runs.py --skip 1 "${runs[@]}"
