#!/usr/bin/env bash
# Start N ranks of an ipt entry point on this node, or on several nodes with a rendezvous.
#
#   NPROC=2 bash launch/torchrun.sh train/pretrain.py experiment=demo
#   NNODES=4 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 bash launch/torchrun.sh ...  # each node
#
# NPROC         ranks per node (default: SLURM's GPUs on the node, else the GPUs torch sees,
#               else 2 on CPU)
# NNODES        nodes (default 1: a standalone rendezvous on this node)
# MASTER_ADDR   MASTER_PORT   the rendezvous endpoint (multi-node; port default 29500); the
#               c10d rendezvous numbers the nodes itself
# RDZV_ID       rendezvous id shared by the nodes of one job (default ipt)
# STOP_TIMEOUT  seconds the ranks get to checkpoint after torchrun is sent SIGTERM (default 120)
# PYTHON        interpreter (default .venv/bin/python)
#
# Exit status: the ranks' status; 75 when they stopped on SIGTERM/SIGUSR1 after checkpointing
# (launch/slurm.sbatch requeues the job then).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3
fail() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
[ $# -ge 1 ] || fail "usage: [NPROC=n] bash launch/torchrun.sh <script.py> [overrides...]"
# the GPUs this node may use: SLURM's share of them inside a job, else what torch sees
# GPUs on this node: SLURM's count, else torch's (which honours CUDA_VISIBLE_DEVICES); a
# machine with neither NVIDIA's nor AMD's tools has none, known without importing torch
if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
  gpus=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi >/dev/null || command -v rocm-smi >/dev/null; then
  gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
else
  gpus=0
fi
default_nproc=$gpus
[ "$default_nproc" -gt 0 ] || default_nproc=2
nproc="${NPROC:-$default_nproc}"
nnodes="${NNODES:-1}"
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || fail "NPROC=$nproc is not a positive number of ranks"
if [ "$gpus" -gt 0 ] && [ "$nproc" -gt "$gpus" ]; then
  fail "NPROC=$nproc ranks but this node has $gpus GPUs for this job; set NPROC<=$gpus" \
       "(one rank per GPU), or ask SLURM for more GPUs per node (--gpus-per-node)"
fi
# each rank sets its own intra-op threads (train.threads_per_rank); set here, torchrun does
# not print its banner about defaulting it to 1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# read by torchrun when no --shutdown_timeout is given (older torch ignores it)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${STOP_TIMEOUT:-120}"
common=(--nproc_per_node "$nproc")
if [ "$nnodes" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  exec "$py" -m ipt.launch --standalone "${common[@]}" "$@"
fi
: "${MASTER_ADDR:?multi-node needs MASTER_ADDR}"
exec "$py" -m ipt.launch --nnodes "$nnodes" "${common[@]}" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv_id "${RDZV_ID:-ipt}" "$@"
