"""The real `launch/slurm.sbatch` on a real SLURM cluster on this machine
(`launch/local_slurm.sh` installs and starts it: two nodes, two slurmd): a 2-rank DeepSpeed
job runs to the end and checkpoints; the same job across 2 nodes (one rank each, torchrun's
c10d rendezvous) logs the same losses; a job sent
SIGUSR1 mid-run checkpoints, requeues itself, resumes (its wandb run too), and logs exactly
the losses of the job that was never interrupted. A Hydra sweep through the submitit launcher
runs one SLURM job per point; one of them is preempted (SIGUSR2, submitit's signal) and
requeued by submitit, and still logs the same losses.

Without root or without a way to install SLURM these tests skip, saying why; under CI they
fail instead."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipt import checkpoint
from ipt.observe import read_metrics

from .conftest import ROOT, tiny_overrides, wandb_records
from .test_resume import losses

pytestmark = pytest.mark.slow

STEPS = 40
OPTS = {"train.max_steps": STEPS, "train.checkpoint_every": 20, "train.eval_every": 1000}
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="session")
def slurm() -> None:
    if os.geteuid() != 0:
        why = "starting a local SLURM cluster needs root (launch/local_slurm.sh)"
    else:
        proc = subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh")],
                              capture_output=True, text=True, timeout=900)
        why = None if proc.returncode == 0 else \
            f"launch/local_slurm.sh failed ({proc.returncode}): {proc.stderr[-2000:]}"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests, but {why}")
        pytest.skip(why)


def submit(overrides: list[str], log: Path, nodes: int = 1) -> str:
    env = {**os.environ, "NPROC": str(2 // nodes), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(["sbatch", "--parsable", f"--output={log}", "--chdir", str(ROOT),
                          f"--nodes={nodes}", "launch/slurm.sbatch", "train/pretrain.py",
                          *overrides],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, check=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait(job_id: str, log: Path, timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(job_id)
        if info["JobState"] in DONE:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} not done in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def reference(slurm, data_dir, tmp_path_factory) -> Path:
    """A job that runs from start to end."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    log = run_dir.parent / "reference.out"
    info = wait(submit(tiny_overrides(data_dir, run_dir, **OPTS), log), log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-6000:]
    return run_dir


def test_sbatch_runs_two_deepspeed_ranks_and_checkpoints(reference):
    assert sorted(losses(reference)) == list(range(1, STEPS + 1))
    ckpts = checkpoint.usable_checkpoints(reference / "checkpoints")
    assert [c.name for c in ckpts] == [checkpoint.tag_for(40), checkpoint.tag_for(20)]
    assert checkpoint.read_state(ckpts[0]).world_size == 2
    log = (reference.parent / "reference.out").read_text()
    assert "ipt: job" in log and "restart 0" in log


def test_two_nodes_one_rank_each_match_one_node(reference, data_dir, tmp_path):
    run_dir = tmp_path / "two-nodes"
    log = tmp_path / "two-nodes.out"
    info = wait(submit(tiny_overrides(data_dir, run_dir, **OPTS), log, nodes=2), log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-6000:]
    assert info["NumNodes"] == "2" and "on 2 node(s)" in log.read_text()
    assert losses(run_dir) == losses(reference)  # same world size, same samples: bitwise


def wait_for_step(job_id: str, metrics: Path, log: Path, step: int = 3) -> None:
    deadline = time.monotonic() + 300
    while not (metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics))):
        text = log.read_text() if log.exists() else ""
        assert time.monotonic() < deadline, text[-4000:]
        assert job(job_id)["JobState"] not in DONE, text[-4000:]
        time.sleep(0.05)


def test_preempted_job_requeues_itself_and_resumes_exactly(reference, data_dir, tmp_path):
    run_dir = tmp_path / "preempted"
    log = tmp_path / "preempted.out"
    job_id = submit(tiny_overrides(data_dir, run_dir, **OPTS, **{"logger.wandb": True}), log)
    wait_for_step(job_id, run_dir / "metrics.jsonl", log)
    # what `--signal=USR1@<seconds>` sends before a time limit: SIGUSR1 to the job's steps
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)

    info = wait(job_id, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-6000:]
    assert info["Restarts"] == "1", text[-6000:]
    assert "requeueing job" in text and "restart 1" in text
    resumed = [line for line in (run_dir / "train.log").read_text().splitlines()
               if "resumed from" in line]
    assert len(resumed) == 1
    assert losses(run_dir) == losses(reference)  # every step, bitwise
    # wandb (offline): the requeued job continued the same run, from the step it stopped at
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == \
        {(run_dir / "wandb_id").read_text()}
    stopped_at = int(resumed[0].split(" at step ")[1].split()[0])
    steps = [int(item.value_json) for r in wandb_records(next(runs[1].glob("*.wandb")))
             if r.HasField("history") for item in r.history.item
             if (item.key or ".".join(item.nested_key)) == "step"]
    assert steps and min(steps) == stopped_at + 1 and max(steps) == STEPS


def test_sweep_on_slurm_with_a_preempted_job(reference, data_dir, tmp_path):
    """`-m hydra/launcher=slurm`: one SLURM job of 2 srun ranks per point; job 0 has the
    reference's config, is preempted, requeued by submitit, and still matches it."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "train/pretrain.py", "-m", "hydra/launcher=slurm",
             *tiny_overrides(data_dir, sweep, **OPTS), "schedule=cosine,constant"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(sweep.glob(".submitit/*_0")):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.2)
        job_id = next(sweep.glob(".submitit/*_0")).name
        wait_for_step(job_id, sweep / "0" / "metrics.jsonl", log)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        assert proc.wait(timeout=600) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    for job_dir in (sweep / "0", sweep / "1"):
        assert "2 ranks" in (job_dir / "train.log").read_text()
    assert "resumed from" in (sweep / "0" / "train.log").read_text()
    assert losses(sweep / "0") == losses(reference)
    summary = (sweep / "sweep_summary.md").read_text()
    assert summary.count("| finished | 40 |") == 2 and "schedule=constant" in summary
