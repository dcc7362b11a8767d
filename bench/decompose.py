"""Dataset Decomposition against best-fit packing on the CPU (`make bench ARGS=decompose`).

The demo corpus (docstrings and package descriptions, 3:1), the tiny model on 2 CPU ranks
(ZeRO-1, one thread each), 8 sequences of 1024 tokens per step either way:
- best-fit packing into sequences of 1024 tokens, documents masked from each other;
- decomposed into pieces of 64 to 1024 tokens, one length per step, in the `natural`
  curriculum (a shuffle of all the epoch's steps, so a short run sees the epoch's mix of
  lengths).
Both runs train the same number of steps, one after the other in the same benchmark; the
first steps (warm-up, and the decomposed run's longest-first step) are left out. Reported:
tokens per second (positions, padding included) and real tokens per second (best-fit's
padding left out), each run's mean step time, and the ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS, SKIP = 40, 5
COMMON = ["experiment=demo", "model.max_seq_len=1024", "data.seq_len=1024",
          "train.micro_batch_size=2", "train.global_batch_size=8", f"train.max_steps={STEPS}",
          "train.eval_every=0", "train.checkpoint_every=0", "train.export_at_end=false",
          "train.threads_per_rank=1", "logger.progress_bar=never", "logger.plot=false",
          "logger.log_every=1", "schedule.warmup_steps=5"]


def train(data: Path, run_dir: Path, extra: list[str]) -> tuple[list[dict], str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train" / "pretrain.py"), f"data.root={data}", f"run_dir={run_dir}",
           *COMMON, *extra]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    from ipt.observe import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")[SKIP:], proc.stderr


def fill(log: str) -> float:
    """The best-fit run's share of real tokens, token-weighted over its sources."""
    import re

    filled = [float(f) for f in re.findall(r"sequences \(([\d.]+)% filled\), weight", log)]
    weights = [float(w) for w in re.findall(r"filled\), weight ([\d.]+)", log)]
    return sum(f * w for f, w in zip(filled, weights, strict=True)) / sum(weights) / 100


def run(data: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        packed, log = train(data, Path(tmp) / "bestfit", ["data.packing=bestfit"])
        pieces, _ = train(data, Path(tmp) / "decompose", [
            "data.packing=decompose", "data.decompose.min_len=64",
            "data.decompose.curriculum=natural"])
    tokens = 8 * 1024 * (STEPS - SKIP)
    packed_s = sum(r["step_time_s"] for r in packed)
    pieces_s = sum(r["step_time_s"] for r in pieces)
    real = fill(log)
    lengths = [r["seq_len"] for r in pieces]
    return {"benchmark": "Dataset Decomposition against best-fit packing (CPU, seq_len 1024, "
                         "min_len 64, tiny model, 2 ranks)",
            "baseline": "best-fit packing, documents masked, the same tokens per step",
            "bestfit_tokens_per_s": round(tokens / packed_s),
            "bestfit_real_tokens_per_s": round(tokens * real / packed_s),
            "decompose_tokens_per_s": round(tokens / pieces_s),
            "ratio": round(packed_s / pieces_s, 3),
            "real_token_ratio": round(packed_s / pieces_s / real, 3),
            "bestfit_fill": round(real, 4),
            "decompose_mean_seq_len": round(sum(lengths) / len(lengths), 1),
            "decompose_lengths": {L: lengths.count(L) for L in sorted(set(lengths))},
            "steps_measured": STEPS - SKIP}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    from ipt.config import DemoDataConfig
    from ipt.data.demo import build_demo_data

    print(json.dumps(run(build_demo_data(DemoDataConfig(out=str(ROOT / "data" / "demo")))),
                     indent=1))
