#!/usr/bin/env bash
# Launch checks on a 1-GPU machine (nccl, bf16): too many ranks for the GPUs is refused, and
# SIGUSR1 to every process stops a run at a step boundary with a checkpoint and exit 75, after
# which the same command resumes. Needs ipt installed in python3's environment and prepared
# data in DATA (default data/gputest: a tokenizer and shards, e.g. the tests' data fixture).
#   OUT=/tmp/gpu-check bash bench/gpu_launch_check.sh
set -x
OUT=${OUT:-/tmp/gpu-launch-check}
mkdir -p "$OUT"
python3 -c "import deepspeed, hydra, ipt; print('imports ok', deepspeed.__version__)"
export PYTHON=$(which python3) OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
OV="data.root=${DATA:-data/gputest} model.hidden_size=256 model.intermediate_size=1024 model.num_layers=4 model.num_heads=4 model.num_kv_heads=4 model.max_seq_len=256 data.seq_len=256 train.micro_batch_size=8 train.global_batch_size=8 train.eval_every=1000 logger.log_every=10 logger.plot=false logger.progress_bar=never train.export_at_end=false train.precision=bf16"
echo "== too many ranks for the GPUs"
NPROC=2 bash launch/torchrun.sh train/pretrain.py $OV run_dir=$OUT/r0; echo "rc=$?"
echo "== preemption on GPU (nccl, bf16): SIGUSR1 to every process, then resume"
NPROC=1 bash launch/torchrun.sh train/pretrain.py $OV run_dir=$OUT/r1 train.max_steps=1000 train.checkpoint_every=100000 > $OUT/r1.log 2>&1 &
pid=$!
for i in $(seq 240); do sleep 0.5; [ -f $OUT/r1/metrics.jsonl ] && [ $(wc -l < $OUT/r1/metrics.jsonl) -ge 50 ] && break; done
t0=$(date +%s%N)
pkill -USR1 -f "train/pretrain.py"
wait $pid; rc=$?; echo "rc=$rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
grep -h "stopping\|stopped\|ipt.launch" $OUT/r1.log | head -5
ls $OUT/r1/checkpoints
NPROC=1 bash launch/torchrun.sh train/pretrain.py $OV run_dir=$OUT/r1 train.max_steps=1000 train.checkpoint_every=100000 > $OUT/r1b.log 2>&1; echo "resume rc=$?"
grep -h "resumed\|finished\|nccl\|NCCL" $OUT/r1/train.log $OUT/r1b.log | head -5
python3 -c "
import json; rows=[json.loads(l) for l in open('$OUT/r1/metrics.jsonl')]
print('rows', len(rows), 'last step', rows[-1]['step'], 'tok/s', rows[-1]['tokens_per_s'], 'mfu', rows[-1].get('mfu'))"

