"""Every ZeRO stage, and CPU offload, trains the same model to the same losses on 2 ranks."""

from __future__ import annotations

import pytest

from ipt.observe import read_metrics

from .conftest import run_pretrain, tiny_overrides

VARIANTS = {
    "zero0": {"deepspeed.stage": 0},
    "zero2": {"deepspeed.stage": 2},
    "zero2-offload": {"deepspeed.stage": 2, "deepspeed.offload_optimizer": True},
    "zero3-offload": {"deepspeed.stage": 3, "deepspeed.offload_optimizer": True,
                      "deepspeed.offload_param": True},
}


@pytest.fixture(scope="module")
def zero1_losses(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("z1") / "zero1"
    run_pretrain(tiny_overrides(data_dir, run, **{"train.max_steps": 6, "train.eval_every": 0}),
                 nproc=2)
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stage_matches_zero1(variant, data_dir, tmp_path, zero1_losses):
    run = tmp_path / variant
    run_pretrain(tiny_overrides(data_dir, run, **{"train.max_steps": 6, "train.eval_every": 0,
                                                  **VARIANTS[variant]}), nproc=2)
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert losses == pytest.approx(zero1_losses, rel=1e-5)
