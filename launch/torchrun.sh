#!/usr/bin/env bash
# Thin torchrun wrapper for one node or many; everything after the options goes to `lisa_dist train`.
#   launch/torchrun.sh [--nnodes N] [--node-rank R] [--nproc N] [--endpoint HOST:PORT] CONFIG.yaml [key=value ...]
# Defaults come from NNODES, NODE_RANK, NPROC_PER_NODE and MASTER_ADDR/MASTER_PORT when set.
set -euo pipefail
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
nproc=${NPROC_PER_NODE:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
endpoint=${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}
while [[ $# -gt 0 ]]; do
  case $1 in
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --endpoint) endpoint=$2; shift 2 ;;
    *) break ;;
  esac
done
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
  --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-lisa_dist}" \
  -m lisa_dist train "$@"
