"""Benchmarks are not run by the suite (they measure, they do not check), but they must keep
running: each data-free one runs here once at a toy size, and its report is sane."""

from __future__ import annotations

import sys

from .conftest import ROOT


def test_the_kd_cost_benchmark_runs_and_reports_every_arm():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import kd_cost
    finally:
        sys.path.remove(str(ROOT / "bench"))
    report = kd_cost.step_time(hidden=64, steps=1)
    for arm in ("ntp", "kd", "kd_offline"):
        assert report[f"step_s_{arm}"] > 0
    assert 0 < report["teacher_over_student_flops"] < 1
    assert report["target_slowdown"] == 1 + 1.2 * report["teacher_over_student_flops"]


def test_the_mtp_cost_benchmark_runs_and_reports_every_arm(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import mtp_cost
    finally:
        sys.path.remove(str(ROOT / "bench"))
    report = mtp_cost.step_time(vocab=512, hidden=32, batch=2, seq=32, steps=1)
    assert report["step_s_ntp"] > 0 and report["step_s_mtp4"] > 0
    assert report["flops_ratio"] > 1
    memory = mtp_cost.memory(vocab=2048, hidden=32, batch=2, seq=64)
    assert memory["peak_mib_mtp4-naive"] > memory["peak_mib_mtp4"] > 0
    assert "skipped" in mtp_cost.decoding(tmp_path)


def test_the_loader_scale_benchmark_runs_both_loaders_and_reports_each_rank(data_dir, tmp_path):
    """At 2M tokens: the baseline commit's loader and today's, cold and warm, on 2 ranks."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import loader_scale
    finally:
        sys.path.remove(str(ROOT / "bench"))
    [row] = loader_scale.run(sizes=(2e6,), ranks=(2,), corpora=tmp_path, train=False,
                             demo=data_dir)
    assert row["old"]["sequences"] == row["cold"]["sequences"] == row["warm"]["sequences"] > 900
    for loader in ("old", "cold", "warm"):
        assert row[loader]["first_batch_s"] > 0 and row[loader]["uss_mb"] > 0
    assert list((tmp_path / "web-2e+06" / "train" / "index").iterdir())  # built once, kept
