"""Preemption and hangs. SIGUSR1 to every process of the job (what SLURM's `--signal` does)
or SIGTERM to the launcher stops a 2-rank run at a step boundary, with a checkpoint of that
step and exit status 75; the same command then resumes and logs exactly the losses of a run
that was never interrupted. A frozen rank ends the job within the configured timeout, with a
message."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

import psutil
import pytest

from ipt import checkpoint
from ipt.cli import EXIT_REQUEUE
from ipt.observe import read_metrics

from .conftest import ROOT, kill_run, output, run_pretrain, start_entry, tiny_overrides
from .test_resume import losses

STEPS = 40


def launch(overrides: list[str], nproc: int, **env_extra: str) -> subprocess.Popen:
    """The ranks under `launch/torchrun.sh`, as a user starts them (torchrun's own signal
    handling is under test here, so never warm); `output` reads what it printed."""
    env = {**os.environ, "NPROC": str(nproc), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **env_extra}
    files = (tempfile.TemporaryFile(), tempfile.TemporaryFile())  # noqa: SIM115 - see output
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", "train/pretrain.py", *overrides],
                            cwd=ROOT, env=env, start_new_session=True, stdout=files[0],
                            stderr=files[1])
    proc.outputs = files  # type: ignore[attr-defined]
    return proc


def wait_for_step(proc: subprocess.Popen, metrics, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}:\n{output(proc)[1]}"
        if metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["usr1-to-all", "term-to-launcher"])
def test_signal_checkpoints_exits_75_and_resumes_identically(data_dir, tmp_path, how):
    opts = {"train.max_steps": STEPS, "train.checkpoint_every": 1000, "train.eval_every": 1000}
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "stopped"
    run_pretrain(tiny_overrides(data_dir, ref_dir, **opts), nproc=2)

    proc = launch(tiny_overrides(data_dir, cut_dir, **opts), nproc=2)
    try:
        wait_for_step(proc, cut_dir / "metrics.jsonl", 3)
        if how == "usr1-to-all":
            # as SLURM does: every process of the step (torchrun starts each rank in its own
            # session, so not a process group); the launcher ignores it, the ranks act on it
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]:
                p.send_signal(signal.SIGUSR1)
        else:
            os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to the ranks
        proc.wait(timeout=120)
        err = output(proc)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_REQUEUE, err[-4000:]
    stopped_at = max(losses(cut_dir))
    assert 3 <= stopped_at < STEPS
    assert "stopped at step" in err
    # the checkpoint of the last step is complete, and it is the only one
    assert checkpoint.usable_checkpoints(cut_dir / "checkpoints") == \
        [cut_dir / "checkpoints" / checkpoint.tag_for(stopped_at)]

    run_pretrain(tiny_overrides(data_dir, cut_dir, **opts), nproc=2)
    assert f"resumed from {cut_dir / 'checkpoints' / checkpoint.tag_for(stopped_at)}" in \
        (cut_dir / "train.log").read_text()
    assert losses(cut_dir) == losses(ref_dir)  # every step, bitwise


def test_signal_to_a_plain_process(data_dir, tmp_path):
    """No launcher: the one process checkpoints and exits 75 itself."""
    run_dir = tmp_path / "one"
    proc = start_entry("train/pretrain.py", tiny_overrides(data_dir, run_dir,
                                                          **{"train.max_steps": STEPS}))
    try:
        wait_for_step(proc, run_dir / "metrics.jsonl", 2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        kill_run(proc)
    assert proc.returncode == EXIT_REQUEUE
    step = max(losses(run_dir))
    assert (run_dir / "checkpoints" / checkpoint.tag_for(step)).is_dir()
    assert not (run_dir / "summary.json").exists()  # the run is not over


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_with_a_message(data_dir, tmp_path):
    """Rank 1 is frozen (SIGSTOP) mid-run: rank 0 waits for it in the next all-reduce, and
    its watchdog ends the job within train.hang_timeout_s, saying why."""
    run_dir = tmp_path / "hung"
    timeout = 8
    opts = {"train.max_steps": 10_000, "train.hang_timeout_s": timeout}
    env_extra = {"STOP_TIMEOUT": "5"}
    proc = launch(tiny_overrides(data_dir, run_dir, **opts), nproc=2, **env_extra)
    try:
        wait_for_step(proc, run_dir / "metrics.jsonl", 3)
        ranks = psutil.Process(proc.pid).children()
        rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        proc.wait(timeout=120)
        err = output(proc)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, EXIT_REQUEUE)
    assert time.monotonic() - frozen < timeout + 5 + 30  # the limit, the check, the teardown
    assert "rank 0: no progress for" in err and "train.hang_timeout_s" in err
    assert "Thread" in err  # the stacks of where rank 0 was waiting
