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


def test_a_checkpoint_loads_partitioned_under_zero3_and_trains_as_under_zero1(data_dir,
                                                                              tmp_path):
    """Continual pre-training of a released-style folder (Qwen2: padded vocabulary, a
    sliding window) on 2 ranks: under ZeRO-3 each rank loads half of it, and the losses are
    ZeRO-1's, where every rank holds it whole."""
    from transformers import AutoModelForCausalLM

    from ipt.data import tokenizer as tok

    from .families import config

    tokenizer = tok.load(data_dir / "tokenizer")
    folder = tmp_path / "qwen2"
    AutoModelForCausalLM.from_config(config("qwen2", vocab=len(tokenizer))).save_pretrained(
        folder)
    tokenizer.save_pretrained(folder)
    losses = {}
    for stage in (1, 3):
        run = tmp_path / f"zero{stage}"
        proc = run_pretrain(tiny_overrides(data_dir, run, **{
            "model.init_from": folder, "deepspeed.stage": stage, "train.max_steps": 3,
            "train.eval_every": 0, "train.checkpoint_every": 3}), nproc=2)
        losses[stage] = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
        if stage == 3:
            log = (run / "train.log").read_text() + proc.stderr
            assert "loaded partitioned (ZeRO-3): this rank holds" in log
    assert losses[3] == pytest.approx(losses[1], rel=1e-5)
