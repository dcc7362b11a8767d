"""2-rank scaling on CPU: the real `train/pretrain.py` under torchrun with 1 and 2 ranks,
one thread per rank, same model and global batch. Reported: tokens/s of each and their ratio
(2.0 would be perfect scaling)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ipt.observe import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_s(data: Path, nproc: int, threads: int, steps: int, run_dir: Path) -> float:
    overrides = [f"data.root={data}", f"run_dir={run_dir}", f"train.max_steps={steps}",
                 "train.micro_batch_size=8", "train.global_batch_size=16",
                 f"train.threads_per_rank={threads}", "train.eval_every=0",
                 "train.checkpoint_every=0", "train.export_at_end=false", "logger.plot=false",
                 "logger.progress_bar=never", "train.resume=never"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / "train" / "pretrain.py"), *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    rows = read_metrics(run_dir / "metrics.jsonl")[3:]  # skip warm-up steps
    return statistics.median(r["tokens_per_s"] for r in rows)


def run(data: Path, steps: int = 20) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        one = tokens_per_s(data, 1, 1, steps, Path(tmp) / "one")
        one_two_threads = tokens_per_s(data, 1, 2, steps, Path(tmp) / "one2")
        two = tokens_per_s(data, 2, 1, steps, Path(tmp) / "two")
    return {"benchmark": "scaling_2_ranks_cpu", "model": "tiny (configs/model/tiny.yaml)",
            "tokens_per_s_1rank_1thread": one, "tokens_per_s_1rank_2threads": one_two_threads,
            "tokens_per_s_2ranks_1thread_each": two, "speedup_2ranks_vs_1rank": two / one,
            "speedup_2ranks_vs_1rank_2threads": two / one_two_threads}
