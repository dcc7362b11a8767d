"""Training runs: continual pre-training from an export, bf16, wandb offline, bad data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ipt.data.tokenizer import fingerprint, train_sentencepiece
from ipt.observe import read_metrics

from .conftest import run_pretrain, tiny_overrides


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("base") / "base"
    run_pretrain(tiny_overrides(data_dir, run_dir, **{"train.max_steps": 12,
                                                      "train.export_at_end": True}))
    return run_dir


def test_continual_pretraining_starts_from_the_exported_weights(exported, data_dir, tmp_path):
    """Initialised from the export, the first loss is the base run's last level, not a random
    model's ln(vocab)."""
    run = tmp_path / "continued"
    run_pretrain(tiny_overrides(data_dir, run, **{
        "model.init_from": exported / "hf", "train.max_steps": 2,
        "schedule.warmup_start_ratio": 0.1, "schedule.warmup_steps": 2}))
    base = read_metrics(exported / "metrics.jsonl")
    first = read_metrics(run / "metrics.jsonl")[0]
    assert first["loss"] < base[0]["loss"] - 0.5
    assert first["loss"] == pytest.approx(base[-1]["val_loss"], abs=0.3)
    assert first["lr"] == pytest.approx(0.1 * 3e-3 + 0.9 * 3e-3 * 0.5)  # re-warm from 10%


def test_bf16_training_runs_and_tracks_fp32(data_dir, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run_pretrain(tiny_overrides(data_dir, fp32, **{"train.max_steps": 4, "train.eval_every": 0}))
    run_pretrain(tiny_overrides(data_dir, bf16, **{"train.max_steps": 4, "train.eval_every": 0,
                                                   "train.precision": "bf16"}))
    a, b = read_metrics(fp32 / "metrics.jsonl"), read_metrics(bf16 / "metrics.jsonl")
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=5e-3)


def test_wandb_logs_offline_without_a_key(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "wb"
    run_pretrain(tiny_overrides(data_dir, run, **{"train.max_steps": 2, "logger.wandb": True,
                                                  "train.eval_every": 0}))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and (run / "wandb_id").read_text() in offline[0].name


def test_tensorboard_gets_every_logged_metric(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    run_pretrain(tiny_overrides(data_dir, run, **{"train.max_steps": 4, "train.eval_every": 2,
                                                  "logger.tensorboard": True}))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = read_metrics(run / "metrics.jsonl")
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows])
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


def test_truncated_shard_fails_before_any_step(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    tokens = next((data / "shards" / "docstrings" / "train").glob("*.tokens"))
    tokens.write_bytes(tokens.read_bytes()[:-10])
    run = tmp_path / "r"
    proc = run_pretrain(tiny_overrides(data, run), check=False)
    assert proc.returncode == 2
    assert "ipt: error:" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert not (run / "metrics.jsonl").exists()


def test_shards_of_another_tokenizer_are_refused(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    raw = (data / "raw" / "docstrings.jsonl").read_text().splitlines()[:200]
    texts = [json.loads(t)["text"] for t in raw]
    shutil.rmtree(data / "tokenizer")
    train_sentencepiece(texts, data / "tokenizer", vocab_size=400)
    proc = run_pretrain(tiny_overrides(data, tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "was tokenized with tokenizer" in proc.stderr


def test_damaged_tokenizer_is_named(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    model = data / "tokenizer" / "tokenizer.model"
    model.write_bytes(model.read_bytes()[:1000])
    for meta in (data / "shards").glob("*/*/shard_*.json"):  # fingerprints stay consistent:
        if meta.parent.name in ("train", "valid"):  # only loading the tokenizer fails
            fixed = json.loads(meta.read_text()) | {"tokenizer": fingerprint(data / "tokenizer")}
            meta.write_text(json.dumps(fixed))
    proc = run_pretrain(tiny_overrides(data, tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "could not be loaded" in proc.stderr
