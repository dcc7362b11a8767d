"""Launch mistakes fail fast and say what to change: the sbatch script run outside SLURM, more
ranks than the job's GPUs, a rank count that is not one, an unwritable run directory."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT, run_pretrain, tiny_overrides


def script(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(cmd, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def test_sbatch_script_outside_slurm_says_how_to_run():
    proc = script(["bash", "launch/slurm.sbatch", "train/pretrain.py"])
    assert proc.returncode == 2
    assert "not inside a SLURM job" in proc.stderr and "sbatch" in proc.stderr


def test_more_ranks_than_the_jobs_gpus():
    proc = script(["bash", "launch/torchrun.sh", "train/pretrain.py"], NPROC="4",
                  SLURM_GPUS_ON_NODE="2")
    assert proc.returncode == 2
    assert "NPROC=4 ranks but this node has 2 GPUs" in proc.stderr
    assert "--gpus-per-node" in proc.stderr


def test_nproc_must_be_a_count():
    proc = script(["bash", "launch/torchrun.sh", "train/pretrain.py"], NPROC="two")
    assert proc.returncode == 2 and "NPROC=two is not a positive number" in proc.stderr


def test_unwritable_run_dir(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # even root cannot make a folder inside a file
    proc = run_pretrain(tiny_overrides(data_dir, blocker / "run"), check=False)
    assert proc.returncode == 2
    assert f"run_dir={blocker / 'run'} is not writable" in proc.stderr
    assert "set run_dir=<a writable folder>" in proc.stderr


def test_an_unresolvable_rendezvous_address_is_named_at_once():
    """Not retried until the rendezvous timeout (15 minutes by default)."""
    proc = script(["bash", "launch/torchrun.sh", "train/pretrain.py"], NNODES="2",
                  MASTER_ADDR="no-such-node.invalid", NPROC="1")
    assert proc.returncode == 2
    assert "'no-such-node.invalid'" in proc.stderr and "does not resolve" in proc.stderr


def test_ranks_started_without_torchrun_check_the_address_too(data_dir, tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "nowhere.invalid",
           "MASTER_PORT": "29500"}
    proc = script([sys.executable, "train/pretrain.py",
                   *tiny_overrides(data_dir, tmp_path / "run")], **env)
    assert proc.returncode == 2
    assert "'nowhere.invalid' (MASTER_ADDR) does not resolve" in proc.stderr


def test_a_cpu_run_compiles_no_deepspeed_op(data_dir, tmp_path, monkeypatch):
    """DeepSpeed's shared-memory op, compiled at its first start on CPU (a minute, and a
    build lock a killed run used to leave behind for every later start to wait on), serves
    only its inference all-reduce: a training run on 2 ranks never builds it."""
    ext = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    run_pretrain(tiny_overrides(data_dir, tmp_path / "run", **{"train.max_steps": 2}), nproc=2)
    assert not ext.exists() or not list(ext.rglob("*.so"))
