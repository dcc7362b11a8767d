"""Does early distillation from a small LM help at toy scale? (SALT, the direction of its claim)

    python experiments/salt_kd.py            # or: make experiment-salt
    python experiments/salt_kd.py --steps 300 --teacher-steps 400 150 --seeds 0 1 --parallel 2

1. A 2-layer SLM is pre-trained on the demo corpora and exported (the teacher), once per
   `--teacher-steps` budget: a long-trained one, and a weaker one whose final loss is above
   the 4-layer baseline's (SALT's setting: the teacher is the smaller, worse model).
2. For each seed, a 4-layer student is pre-trained from the same initial weights on the
   same sample order: with next-token loss only (the baseline), and with KD from each
   SLM for the first `kd_fraction` of the steps (w = 0.5, tau = 1, hard switch), then
   next-token loss. Everything else (schedule, batch, data) is identical.
3. Reported per seed: each run's final validation loss, and the step at which each first
   reaches the baseline's final validation loss (linear interpolation between evaluations;
   null if it never does).

Every run is the real entry point (`train/pretrain.py`, one process, one thread, DeepSpeed
ZeRO-1), `--parallel` at a time. Results go to experiments/results/salt_kd.json and a table
on stdout; docs/salt.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ipt.config import DemoDataConfig  # noqa: E402
from ipt.data.demo import build_demo_data  # noqa: E402
from ipt.observe import read_metrics  # noqa: E402


def train(run_dir: Path, overrides: list[str], log: Path) -> Path:
    """One pre-training run to its end (resumes if it was interrupted); its metrics file."""
    if (run_dir / "summary.json").exists():
        return run_dir / "metrics.jsonl"
    cmd = [sys.executable, str(ROOT / "train" / "pretrain.py"), f"run_dir={run_dir}",
           "train.threads_per_rank=1", "logger.progress_bar=never", "logger.plot=false",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return run_dir / "metrics.jsonl"


def val_curve(metrics: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(metrics) if "val_loss" in r]


def steps_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the validation loss reaches `target` (interpolated)."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:], strict=False):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return curve[0][0] if curve and curve[0][1] <= target else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=[400, 150])
    ap.add_argument("--kd-fraction", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "exp-salt"))
    args = ap.parse_args()

    data = build_demo_data(DemoDataConfig(out=str(ROOT / "data" / "demo")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["experiment=demo", f"data.root={data}", "train.micro_batch_size=8",
              "train.global_batch_size=16", "train.eval_batches=8", "train.checkpoint_every=100",
              "train.keep_last=1"]
    every = max(1, args.steps // 20)
    for t in args.teacher_steps:
        train(out / f"slm-t{t}", [*common, "model.num_layers=2", f"train.max_steps={t}",
                                  f"train.eval_every={t // 4}", "train.seed=100",
                                  "data.seed=100"], out / f"slm-t{t}.log")
    kd_steps = round(args.kd_fraction * args.steps)
    runs = {}
    for seed in args.seeds:
        base = [*common, f"train.max_steps={args.steps}", f"train.eval_every={every}",
                f"train.seed={seed}", f"data.seed={seed}", "train.export_at_end=false"]
        runs[(seed, "baseline")] = (out / f"baseline-s{seed}", base)
        for t in args.teacher_steps:
            runs[(seed, t)] = (out / f"kd-t{t}-s{seed}",
                               [*base, "teacher=kd", f"teacher.path={out / f'slm-t{t}' / 'hf'}",
                                f"teacher.kd_steps={kd_steps}"])
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {key: pool.submit(train, d, o, d.with_suffix(".log"))
                   for key, (d, o) in runs.items()}
        curves = {key: val_curve(f.result()) for key, f in futures.items()}

    teachers = []
    for t in args.teacher_steps:
        rows = []
        for seed in args.seeds:
            base, kd = curves[(seed, "baseline")], curves[(seed, t)]
            target = base[-1][1]
            rows.append({"seed": seed, "baseline_final_val": target, "kd_final_val": kd[-1][1],
                         "baseline_steps_to_target": steps_to(base, target),
                         "kd_steps_to_target": steps_to(kd, target),
                         "baseline_curve": base, "kd_curve": kd})
        final = val_curve(out / f"slm-t{t}" / "metrics.jsonl")[-1][1]
        teachers.append({"teacher_steps": t, "teacher_final_val": final, "runs": rows})
    result = {"steps": args.steps, "kd_steps": kd_steps, "teacher_layers": 2,
              "student_layers": 4, "global_batch": 16, "seq_len": 256, "teachers": teachers}
    dest = ROOT / "experiments" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "salt_kd.json").write_text(json.dumps(result, indent=1))
    print(f"students: 4 layers, {args.steps} steps; KD for the first {kd_steps}")
    print("teacher (2 layers)        seed  baseline final  KD final  steps to baseline's final"
          " (baseline / KD)")
    for t in teachers:
        for r in t["runs"]:
            kd_at = r["kd_steps_to_target"]
            print(f"{t['teacher_steps']:>4} steps, val {t['teacher_final_val']:.3f}  "
                  f"{r['seed']:>4}  {r['baseline_final_val']:>14.4f}  {r['kd_final_val']:>8.4f}"
                  f"  {r['baseline_steps_to_target']:>6.0f} / "
                  f"{'never' if kd_at is None else f'{kd_at:.0f}'}")


if __name__ == "__main__":
    main()
