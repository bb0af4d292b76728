#!/usr/bin/env bash
# LLaMA-2-70B on 8 ranks: `lisa-dist estimate` with each memory lever added in turn (docs/estimate.md).
# Usage: scripts/estimate_levers.sh > levers.jsonl   (one JSON object per line; about 2 minutes per run)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin/lisa-dist}
# Each config file is stripped of its levers so the rows build on the plain FSDP2 setup.
BASE="train.reduce_dtype=fp32 engine.split_layers=false model.activation_offload=false optim.offload_state=false"
run() {
  local name=$1 config=$2; shift 2
  # shellcheck disable=SC2086
  "$BIN" estimate "configs/llama2_70b_$config.yaml" $BASE "$@" --world-size "${WORLD:-8}" --json \
    | tail -n 1 | python3 -c "import json,sys; r=json.load(sys.stdin); r['run']='$name'; print(json.dumps(r))"
}
for config in lomo lisa; do
  run "$config: plain" $config
  run "$config: + bf16 reduce" $config train.reduce_dtype=param
  run "$config: + bf16 reduce + activation offload" $config train.reduce_dtype=param model.activation_offload=true
  run "$config: + bf16 reduce + activation offload + split layers" $config train.reduce_dtype=param \
    model.activation_offload=true engine.split_layers=true
done
run "lisa: + bf16 reduce + activation offload + optimizer offload" lisa train.reduce_dtype=param \
  model.activation_offload=true optim.offload_state=true
run "lisa: + bf16 reduce + activation offload + optimizer offload + split layers" lisa train.reduce_dtype=param \
  model.activation_offload=true optim.offload_state=true engine.split_layers=true
