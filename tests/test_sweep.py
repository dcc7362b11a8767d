"""Sweeps: Hydra multirun over a config group and a value with the basic launcher; every job
in its own directory with its resolved config, its wandb run grouped under the sweep, and a
summary table of final metrics when the sweep ends."""

from __future__ import annotations

import csv

from omegaconf import OmegaConf

from ipt.observe import read_metrics
from ipt.sweep import main as sweep_main

from .conftest import run_entry, tiny_overrides, wandb_records


def test_local_sweep_over_a_group_and_a_value(data_dir, tmp_path):
    sweep = tmp_path / "lr-sched"
    overrides = tiny_overrides(data_dir, sweep, **{"train.max_steps": 4, "logger.wandb": True})
    proc = run_entry("train/pretrain.py", ["-m", *overrides, "schedule=cosine,constant",
                                           "optim.lr=1e-3,3e-3"], env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-4000:]

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        cfg = OmegaConf.load(job / "config.yaml")  # resolved: the job's own values
        assert cfg.run_dir == str(job) and cfg.name == f"lr-sched-{job.name}"
        seen.add((cfg.schedule.name, cfg.optim.lr))
        assert (job / "hydra" / "overrides.yaml").exists()
        assert max(r["step"] for r in read_metrics(job / "metrics.jsonl")) == 4
        (run_file,) = (job / "wandb").rglob("run-*.wandb")
        (run,) = [r.run for r in wandb_records(run_file) if r.HasField("run")]
        assert run.run_group == "lr-sched" and run.display_name == cfg.name
    assert seen == {("cosine", 1e-3), ("cosine", 3e-3), ("constant", 1e-3), ("constant", 3e-3)}

    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    for row, job in zip(rows, jobs, strict=True):
        last = read_metrics(job / "metrics.jsonl")[-1]
        assert row["status"] == "finished" and row["step"] == "4"
        assert float(row["loss"]) == last["loss"]
        # only what differs between the jobs
        assert sorted(o.split("=")[0] for o in row["overrides"].split()) == ["optim.lr",
                                                                             "schedule"]
    assert "| job | overrides | status |" in proc.stdout
    assert (sweep / "sweep_summary.md").read_text().count("| finished |") == 4


def test_summary_cli_on_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    assert sweep_main([str(tmp_path)]) == 2
    assert "holds no sweep jobs" in capsys.readouterr().err
