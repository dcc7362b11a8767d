"""The GPU session's kit-independent parts, run for real on the CPU: `bench/gpu_session.sh
--quick` end to end (every step, every record of the plan), the budget's skip and hard limit,
the FLOP counts, and the peak FLOP/s table by exact device name."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from ipt.observe import peak_flops

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402
import gpu_measure  # noqa: E402

sys.path.remove(str(ROOT / "bench"))


def test_peak_flops_go_by_the_exact_device_name(caplog):
    assert peak_flops(None, "NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(None, "NVIDIA H100 PCIe") == 756e12  # not the SXM part's peak
    assert peak_flops(None, "NVIDIA H100 NVL") == 835e12
    assert peak_flops(None, "NVIDIA H200") == 989e12
    assert peak_flops(5e12, "NVIDIA H100 PCIe") == 5e12  # logger.peak_flops wins
    with caplog.at_level(logging.WARNING):
        assert peak_flops(None, "NVIDIA H100 Something New") is None
    assert "NVIDIA H100 Something New" in caplog.text and "logger.peak_flops" in caplog.text


def test_attention_keys_count_causal_pairs_within_each_document():
    import torch

    batch = {"cu_seqlens": torch.tensor([0, 3, 4, 8], dtype=torch.int32)}
    assert gpu_measure.attention_keys(batch) == 6 + 1 + 10


def test_the_budget_scales_by_the_worst_overrun_and_its_hard_limit_fires():
    fired = threading.Event()
    budget = gpu.Budget(0.2, 0.1, 1.0, fired.set)
    assert budget.expected(10) == 10
    budget.finished(10, 5)
    budget.finished(10, 20)
    assert budget.expected(10) == 20  # the worst seen, not the mean
    assert fired.wait(2) and budget.left() < 0


def run_session(data_dir, out, *bench_args, limit_s=400):
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(data_dir),
           "KIT": str(out / "no-kit"), "OMP_NUM_THREADS": "2", "SESSION_S": str(limit_s),
           "BENCH_ARGS": " ".join(["--micro-batch", "2", "--accum", "1", "--warmup", "1",
                                   "--measure", "2", *bench_args])}
    return subprocess.run(["bash", "bench/gpu_session.sh", "--quick", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_quick_session_runs_every_step_and_writes_every_record(data_dir, tmp_path):
    out = tmp_path / "session"
    proc = run_session(data_dir, out, "--peak-tflops", "1")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert {p.name for p in out.iterdir()} == {"session.log", "versions.json", "nvidia-smi.txt",
                                               "ceiling.json", "records.jsonl", "summary.md"}
    assert json.loads((out / "versions.json").read_text())["deepspeed"][0].isdigit()
    assert json.loads((out / "ceiling.json").read_text())["gemm_tflops_median"] > 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    args = type("Args", (), {"quick": True, "extra": "", "micro_batch": 2, "accum": 1})()
    planned = [s.name for s in gpu.plan(args, gpu.Records(tmp_path / "probe", {}))]
    assert [r["name"] for r in records] == planned
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    timed = [r for r in records if "tokens_per_s" in r]
    assert len(timed) >= 15
    for r in (r for r in timed if r["kind"] == "trainer"):
        # the four MFUs: the matmuls alone < as executed (causal, per document) <= the
        # conventional count (every token over its whole row); a GEMM share from the ceiling
        assert 0 < r["mfu_6n"] < r["mfu_executed"] <= r["mfu"], r["name"]
        assert r["gemm_ceiling_share"] > 0 and r["timed_steps"] == 2
        assert r["step_time_spread_s"]["min"] <= r["step_time_spread_s"]["max"]
        assert r["recompiles"] == 0 or r["name"] == "1b-ac-selective", r  # layers differ there
    assert "bare_ratio" in records[[r["name"] for r in records].index("1b-eager")]
    assert "1b-ac-full" in (out / "summary.md").read_text()
    assert "bench/gpu.py exited 0" in (out / "session.log").read_text()


def test_the_hard_limit_ends_the_run_in_flight_and_keeps_what_finished(data_dir, tmp_path):
    """A limit 20 s after the start: the sdpa parity finishes, 1b eager is ended mid-run, and
    both are in records.jsonl. A million steps cannot finish in 20 s on any machine (1000 did,
    on a fast CI host)."""
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--quick", "--data", str(data_dir), "--out", str(out),
         "--only", "parity-sdpa,1b-eager", "--budget-s", "60", "--grace-s", "-40",
         "--micro-batch", "2", "--accum", "1", "--warmup", "1", "--measure", "1000000"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 124, proc.stderr[-3000:]
    assert time.perf_counter() - start < 60
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["parity-sdpa-float32", "1b-eager"]
    assert "max_abs_logit_diff" in records[0]
    assert "hard limit" in records[1]["error"]
    assert (out / "summary.md").exists()
