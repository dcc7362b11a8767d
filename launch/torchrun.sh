#!/usr/bin/env bash
# Start N ranks of an ipt entry point on this node, or on several nodes with a rendezvous.
#
#   NPROC=2 bash launch/torchrun.sh train/pretrain.py experiment=demo
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 bash launch/torchrun.sh ...
#
# NPROC        ranks per node (default: GPUs on the node, else 2)
# NNODES       nodes (default 1: a standalone rendezvous on this node)
# NODE_RANK    this node's index (multi-node)
# MASTER_ADDR  MASTER_PORT   the rendezvous endpoint (multi-node)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc="${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}"
nnodes="${NNODES:-1}"
if [ "$gpus" -gt 0 ] && [ "$nproc" -gt "$gpus" ]; then
  echo "launch/torchrun.sh: NPROC=$nproc ranks but this node has $gpus GPUs; set NPROC<=$gpus" >&2
  exit 2
fi
if [ "$nnodes" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  exec "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$@"
fi
: "${MASTER_ADDR:?multi-node needs MASTER_ADDR}" "${NODE_RANK:=0}"
exec "$py" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$NODE_RANK" \
  --nproc_per_node "$nproc" --rdzv_backend c10d \
  --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-ipt}" "$@"
