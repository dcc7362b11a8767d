"""Dataset Decomposition against best-fit packing at toy scale, at the same token budget.

    python experiments/dd_vs_bestfit.py          # or: make experiment-dd
    python experiments/dd_vs_bestfit.py --steps 180 --seeds 0 1 --parallel 2

For each seed, the tiny model (4 layers) is pre-trained from the same initial weights on the
demo corpora, 8 x 1024 tokens a step, for `--steps` steps (about one epoch):
- `bestfit`: documents best-fit packed into sequences of 1024 tokens, masked from each other;
- `grow_p2`: Dataset Decomposition into pieces of 64 to 1024 tokens, the Grow-P2
  curriculum (short pieces early in the epoch, long ones late).
Everything else (schedule, optimizer, data seed) is identical. Both are scored on the same
validation set: best-fit sequences of 1024 tokens of the held-out documents. Reported per
seed: the final validation loss, the validation curve and the run's wall time.

Every run is the real entry point (`train/pretrain.py`, one process, one thread, DeepSpeed
ZeRO-1), `--parallel` at a time. Results go to experiments/results/dd_vs_bestfit.json (with
`--steps` other than 180: dd_vs_bestfit_<steps>.json) and a table on stdout; docs/data.md
records them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ipt.config import DemoDataConfig  # noqa: E402
from ipt.data.demo import build_demo_data  # noqa: E402
from ipt.observe import read_metrics  # noqa: E402

ARMS = {"bestfit": ["data.packing=bestfit"],
        "grow_p2": ["data.packing=decompose", "data.decompose.min_len=64",
                    "data.decompose.curriculum=grow_p2"]}


def train(run_dir: Path, overrides: list[str]) -> tuple[list[dict], float]:
    """One pre-training run to its end: its metrics and wall time (0 if it was done)."""
    start = time.perf_counter()
    if not (run_dir / "summary.json").exists():
        cmd = [sys.executable, str(ROOT / "train" / "pretrain.py"), f"run_dir={run_dir}",
               "train.threads_per_rank=1", "logger.progress_bar=never", "logger.plot=false",
               *overrides]
        with open(run_dir.with_suffix(".log"), "w") as out:
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    return read_metrics(run_dir / "metrics.jsonl"), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=180)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default=None, help="run folders (default: runs/exp-dd, or "
                    "runs/exp-dd-<steps> with other --steps)")
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "runs" / ("exp-dd" + ("" if args.steps == 180
                                                            else f"-{args.steps}")))

    data = build_demo_data(DemoDataConfig(out=str(ROOT / "data" / "demo")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["experiment=demo", f"data.root={data}", "model.max_seq_len=1024",
              "data.seq_len=1024", "train.micro_batch_size=2", "train.global_batch_size=8",
              f"train.max_steps={args.steps}", f"train.eval_every={max(1, args.steps // 6)}",
              "train.eval_batches=16", "train.checkpoint_every=0", "train.export_at_end=false",
              "schedule.warmup_steps=10"]
    runs = {(seed, arm): (out / f"{arm}-s{seed}",
                          [*common, *extra, f"train.seed={seed}", f"data.seed={seed}"])
            for seed in args.seeds for arm, extra in ARMS.items()}
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {key: pool.submit(train, d, o) for key, (d, o) in runs.items()}
        done = {key: f.result() for key, f in futures.items()}

    rows = []
    for (seed, arm), (metrics, seconds) in done.items():
        curve = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
        rows.append({"seed": seed, "arm": arm, "final_val_loss": curve[-1][1],
                     "wall_s": round(seconds, 1), "tokens": metrics[-1]["tokens"],
                     "curve": curve})
    result = {"steps": args.steps, "tokens_per_step": 8 * 1024, "model": "tiny (4 layers)",
              "arms": {arm: " ".join(extra) for arm, extra in ARMS.items()}, "runs": rows}
    dest = ROOT / "experiments" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    name = "dd_vs_bestfit" + ("" if args.steps == 180 else f"_{args.steps}")
    (dest / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"tiny model, {args.steps} steps x 8 x 1024 tokens; validation: best-fit 1024")
    print("seed  arm       final val loss  wall s")
    for r in sorted(rows, key=lambda r: (r["seed"], r["arm"])):
        print(f"{r['seed']:>4}  {r['arm']:<8}  {r['final_val_loss']:>14.4f}  {r['wall_s']:>6.0f}")


if __name__ == "__main__":
    main()
