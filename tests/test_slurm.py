"""The real `launch/slurm.sbatch` on a real one-node SLURM cluster (`launch/local_slurm.sh`
installs and starts it): a 2-rank DeepSpeed job runs to the end and checkpoints; a job sent
SIGUSR1 mid-run checkpoints, requeues itself, resumes, and logs exactly the losses of the job
that was never interrupted.

Without root or without a way to install SLURM these tests skip, saying why; under CI they
fail instead."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ipt import checkpoint
from ipt.observe import read_metrics

from .conftest import ROOT, tiny_overrides
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


def submit(overrides: list[str], log: Path) -> str:
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(["sbatch", "--parsable", f"--output={log}", "--chdir", str(ROOT),
                          "launch/slurm.sbatch", "train/pretrain.py", *overrides],
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


def test_preempted_job_requeues_itself_and_resumes_exactly(reference, data_dir, tmp_path):
    run_dir = tmp_path / "preempted"
    log = tmp_path / "preempted.out"
    job_id = submit(tiny_overrides(data_dir, run_dir, **OPTS), log)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and any(r["step"] >= 3 for r in read_metrics(metrics))):
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        assert job(job_id)["JobState"] not in DONE, log.read_text()[-4000:]
        time.sleep(0.05)
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


def test_sbatch_script_outside_slurm_says_how_to_run():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "train/pretrain.py"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "not inside a SLURM job" in proc.stderr and "sbatch" in proc.stderr
