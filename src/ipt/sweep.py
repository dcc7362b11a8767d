"""Sweeps: Hydra multirun over config values or groups, locally or on SLURM.

    python train/pretrain.py -m optim.lr=1e-3,3e-3 loss=ntp,mtp name=lr-sweep
    python train/pretrain.py -m hydra/launcher=slurm ... # one SLURM job per run (submitit)

Each run of a sweep is a job `<run_dir>/<num>` of the sweep directory `run_dir`
(`runs/<name>`): its own checkpoints, metrics, resolved config (`config.yaml`) and Hydra's
record of its overrides (`hydra/overrides.yaml`). Its wandb run is named `<name>-<num>` and
grouped under the sweep's name. When the sweep ends, `SweepSummary` (a Hydra callback) writes
`sweep_summary.md`, `.csv` and `.json` beside the jobs: one row per job, its overrides and final
metrics; `python -m ipt.sweep <sweep dir>` writes them again at any time (jobs still running
show as such). Running the same sweep command again resumes every unfinished job.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ipt.observe import read_metrics

COLUMNS = ("job", "overrides", "status", "step", "loss", "val_loss", "tokens", "tokens_per_s")


def for_job(cfg: DictConfig) -> DictConfig:
    """Inside a multirun job: the job's own run directory, name and wandb group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg
    hydra = HydraConfig.get()
    with open_dict(cfg):
        sweep_name = cfg.name
        cfg.run_dir = hydra.runtime.output_dir
        if cfg.logger.get("wandb_group") is None:
            cfg.logger.wandb_group = sweep_name
        cfg.name = f"{sweep_name}-{hydra.job.num}"
    return cfg


def _status(job: Path, rows: list[dict[str, Any]]) -> str:
    """finished (summary.json written at the end), incomplete (running, stopped or failed:
    train.log says which), or not started."""
    if (job / "summary.json").exists():
        return "finished"
    return "incomplete" if rows else "not started"


def job_row(job: Path) -> dict[str, Any]:
    """One job's overrides and final metrics (the last logged value of each)."""
    overrides_file = job / "hydra" / "overrides.yaml"
    overrides: Any = OmegaConf.load(overrides_file) if overrides_file.exists() else []
    metrics = job / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.exists() else []
    last: dict[str, Any] = {}
    for r in rows:
        last.update({k: v for k, v in r.items() if v is not None})
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"job": job.name, "overrides": " ".join(str(o) for o in overrides),
            "status": _status(job, rows), "step": last.get("step"), "loss": last.get("loss"),
            "val_loss": last.get("val_loss"), "tokens": last.get("tokens"),
            "tokens_per_s": sum(speeds) / len(speeds) if speeds else None}


def jobs(sweep_dir: Path) -> list[Path]:
    found = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name))


def _varying(overrides: list[list[str]]) -> set[str]:
    """Keys whose value is not the same in every job (all keys when there is one job)."""
    per_job = [dict(o.partition("=")[::2] for o in job) for job in overrides]
    keys = set().union(*per_job)
    if len(per_job) == 1:
        return keys
    return {k for k in keys if len({job.get(k) for job in per_job}) > 1}  # absent: None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def summarize(sweep_dir: Path) -> str:
    """Write sweep_summary.md/.csv/.json in `sweep_dir`; return the markdown table."""
    sweep_dir = Path(sweep_dir)
    found = jobs(sweep_dir)
    if not found:
        raise FileNotFoundError(f"{sweep_dir} holds no sweep jobs (folders 0, 1, ...); is it "
                                "the run_dir of a multirun (`-m`)?")
    table = [job_row(j) for j in found]
    # the overrides column shows what differs between the jobs; the JSON keeps them all
    full = [r["overrides"] for r in table]
    varying = _varying([o.split() for o in full])
    shown = [{**r, "overrides": " ".join(o for o in f.split() if o.split("=")[0] in varying)}
             for r, f in zip(table, full, strict=True)]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in shown]
    text = "\n".join(lines) + "\n"
    (sweep_dir / "sweep_summary.md").write_text(f"# Sweep {sweep_dir}\n\n{text}")
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(table, indent=1))
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(shown)
    return text


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra-core always has it from 1.1 on
    _HydraCallback = object  # type: ignore[assignment,misc]


class SweepSummary(_HydraCallback):
    """Hydra callback (`hydra.callbacks` in the job configs): the summary table once the sweep's
    jobs are done, from the process that launched them."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        found = jobs(sweep_dir) if sweep_dir.is_dir() else []
        if found:
            table = summarize(sweep_dir)
            print(f"\nipt: sweep {sweep_dir} ({len(found)} jobs)\n{table}"
                  f"  written to {sweep_dir / 'sweep_summary.md'} (and .csv, .json)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ipt.sweep <sweep dir>", file=sys.stderr)
        return 2
    try:
        print(summarize(Path(args[0])), end="")
    except FileNotFoundError as e:
        print(f"ipt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
