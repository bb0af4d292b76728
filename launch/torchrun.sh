#!/usr/bin/env bash
# Thin torchrun wrapper for one node or many; everything after the options goes to `lisa_dist train`.
#   launch/torchrun.sh [--nnodes N] [--node-rank R] [--nproc N] [--endpoint HOST:PORT] [--local-addr ADDR]
#                      [--rdzv-conf K=V,...] CONFIG.yaml [key=value ...]
# Defaults come from NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR/MASTER_PORT, LOCAL_ADDR and RDZV_CONF.
# On nodes whose hostname does not resolve to the address the others reach (several interfaces, network
# namespaces), pass --local-addr with that address, --rdzv-conf is_host=1 on the endpoint's node, and set
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface.
set -euo pipefail
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
nproc=${NPROC_PER_NODE:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
endpoint=${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}
rdzv_conf=${RDZV_CONF:-}
local_addr=${LOCAL_ADDR:-}
while [[ $# -gt 0 ]]; do
  case $1 in
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --endpoint) endpoint=$2; shift 2 ;;
    --rdzv-conf) rdzv_conf=$2; shift 2 ;;
    --local-addr) local_addr=$2; shift 2 ;;
    *) break ;;
  esac
done
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
  --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-lisa_dist}" ${rdzv_conf:+--rdzv_conf "$rdzv_conf"} \
  ${local_addr:+--local_addr "$local_addr"} \
  -m lisa_dist train "$@"
