#!/usr/bin/env bash
# Launch checks on a 1-GPU machine (nccl, bf16): too many ranks for the GPUs is refused, and
# SIGUSR1 to every process of the run (found by process id, from the launcher down; never by
# name, which could reach another user's training) stops it at a step boundary with a
# checkpoint and exit 75, after which the same command resumes. Uses the offline kit as bench/gpu_session.sh does (KIT,
# default gpu-kit) and its corpus (DATA, default $KIT/data/gpubench).
#   OUT=/tmp/gpu-check bash bench/gpu_launch_check.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-launch-check}
KIT=${KIT:-gpu-kit}
DATA=${DATA:-$KIT/data/gpubench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
source bench/gpu_env.sh
set -x
"$PY" -c "import deepspeed, hydra, ipt; print('imports ok', deepspeed.__version__)" || exit 4
export PYTHON=$PY OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
OV="data.root=$DATA model.hidden_size=256 model.intermediate_size=1024 model.num_layers=4 model.num_heads=4 model.num_kv_heads=4 model.max_seq_len=256 data.seq_len=256 train.micro_batch_size=8 train.global_batch_size=8 train.eval_every=1000 logger.log_every=10 logger.plot=false logger.progress_bar=never train.export_at_end=false train.precision=bf16"
echo "== too many ranks for the GPUs"
NPROC=2 bash launch/torchrun.sh train/pretrain.py $OV run_dir=$OUT/r0; echo "rc=$?"
echo "== preemption on GPU (nccl, bf16): SIGUSR1 to every process, then resume"
NPROC=1 bash launch/torchrun.sh train/pretrain.py $OV run_dir=$OUT/r1 train.max_steps=1000 train.checkpoint_every=100000 > $OUT/r1.log 2>&1 &
pid=$!
for i in $(seq 240); do sleep 0.5; [ -f $OUT/r1/metrics.jsonl ] && [ $(wc -l < $OUT/r1/metrics.jsonl) -ge 50 ] && break; done
t0=$(date +%s%N)
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
kill -USR1 $(descendants $pid)
wait $pid; rc=$?; echo "rc=$rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
grep -h "stopping\|stopped\|ipt.launch" $OUT/r1.log | head -5
ls $OUT/r1/checkpoints
NPROC=1 bash launch/torchrun.sh train/pretrain.py $OV run_dir=$OUT/r1 train.max_steps=1000 train.checkpoint_every=100000 > $OUT/r1b.log 2>&1; echo "resume rc=$?"
grep -h "resumed\|finished\|nccl\|NCCL" $OUT/r1/train.log $OUT/r1b.log | head -5
"$PY" -c "
import json; rows=[json.loads(l) for l in open('$OUT/r1/metrics.jsonl')]
print('rows', len(rows), 'last step', rows[-1]['step'], 'tok/s', rows[-1]['tokens_per_s'], 'mfu', rows[-1].get('mfu'))"

