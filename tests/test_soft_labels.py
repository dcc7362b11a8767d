"""Offline soft labels: the teacher's top-K stored beside the shards, read back by the loader,
distilled from like the online teacher, and refused when they do not line up."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipt.config import ConfigError, ScoreConfig
from ipt.data import tokenizer as tok
from ipt.data.loader import Concat, PackedShards
from ipt.data.shards import ShardSet
from ipt.losses.kd import kd_losses, offline_probs, online_probs
from ipt.observe import read_metrics
from ipt.slm import soft_labels
from ipt.slm.score import score

from .conftest import run_pretrain, scored_copy, tiny_overrides
from .test_kd import rolled_back_into_the_kd_phase, setup

SOURCES = ("docstrings", "packages")


def test_storing_every_token_distils_exactly_like_the_online_teacher():
    h_s, h_t, labels, head_s, head_t = setup(vocab=50)
    logp = F.log_softmax(head_t(h_t), -1)
    ids = torch.arange(50).expand(*labels.shape, 50)
    tau, w = 2.0, 0.3
    online = kd_losses(head_s(h_s), labels, online_probs(h_t, head_t, tau), tau, w, 13)
    online[0].backward()
    grad = h_s.grad.clone()
    h_s.grad = None
    offline = kd_losses(head_s(h_s), labels, offline_probs(ids, logp, 50, tau), tau, w, 13)
    offline[0].backward()
    torch.testing.assert_close(offline[:3], online[:3])
    torch.testing.assert_close(h_s.grad, grad)


def test_a_top_k_teacher_is_its_distribution_truncated_and_renormalised():
    h_s, h_t, labels, head_s, head_t = setup(vocab=40)
    logp = F.log_softmax(head_t(h_t), -1)
    top, ids = logp.topk(5, dim=-1)
    _, ce, kd, _ = kd_losses(head_s(h_s), labels, offline_probs(ids, top, 40, 1.0), 1.0, 0.5, 16)
    keep = labels != -100
    p = torch.zeros_like(logp).scatter_(-1, ids, F.softmax(top, -1))[keep]
    expected = -(p * F.log_softmax(head_s(h_s)[keep], -1)).sum()
    torch.testing.assert_close(kd, expected)
    assert torch.allclose(p.sum(-1), torch.ones(len(p)))


@pytest.fixture(scope="module")
def labelled(data_dir, tiny_lm, tmp_path_factory):
    """A copy of the session's data with top-16 soft labels for 64-token packing."""
    root, out = scored_copy(data_dir, tiny_lm, tmp_path_factory.mktemp("labelled"),
                            scores=False, soft_labels=16, block_size=128)
    assert all(set(v) == {"soft_labels"} and v["soft_labels"] for v in out.values())
    return root


def packed(root, name="docstrings", seq_len=64) -> PackedShards:
    return PackedShards(ShardSet(root / "shards" / name / "train"), seq_len)


def test_the_stage_stores_the_teacher_top_k_of_every_position(labelled, tiny_lm):
    from transformers import AutoModelForCausalLM

    data = packed(labelled)
    tokenizer = tok.load(labelled / "tokenizer")
    labels = soft_labels.SourceSoftLabels("docstrings", labelled / "shards" / "docstrings", data,
                                          tok.fingerprint(labelled / "tokenizer"), len(tokenizer))
    meta = labels.meta
    assert meta["sequences"] == len(data) and meta["top_k"] == 16 and meta["ids_dtype"] == "uint16"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    for i in (0, 129, len(data) - 1):  # blocks 0, 1 and the last
        item = data[i]
        with torch.no_grad():
            logits = model(input_ids=item["input_ids"][None],
                           position_ids=item["position_ids"][None]).logits[0]
        top, ids = F.log_softmax(logits, -1).topk(16, dim=-1)
        got_ids, got_logp = labels[i]
        assert got_ids.shape == (64, 16)
        torch.testing.assert_close(got_logp, top, atol=1e-2, rtol=1e-3)  # stored in fp16
        assert (got_ids == ids).float().mean() > 0.99  # ties may swap within fp32 noise


def test_a_killed_stage_redoes_only_its_missing_blocks(labelled, tiny_lm, tmp_path):
    src = tmp_path / "docstrings"
    shutil.copytree(labelled / "shards" / "docstrings", src)
    out = soft_labels.directory(src, packed(labelled))
    blocks = sorted(out.glob("block_*.ids.npy"))
    before = {p: p.read_bytes() for p in out.glob("block_*.npy")}
    mtimes = {p: p.stat().st_mtime_ns for p in blocks[1:]}
    blocks[0].unlink()
    (out / "meta.json").unlink()  # as if killed before the last block was in
    cfg = ScoreConfig(slm=str(tiny_lm), tokenizer=str(labelled / "tokenizer"), seq_len=64,
                      sources={"docs": str(src)}, scores=False, soft_labels=16,
                      block_size=128, progress_bar="never")
    assert score(cfg)["docs"]["soft_labels"] == str(out)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert {p: p.read_bytes() for p in out.glob("block_*.npy")} == before

    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_lm, other)
    with pytest.raises(ConfigError, match="started with other settings.*model"):
        score(ScoreConfig(**{**cfg.__dict__, "slm": str(other)}))


def test_a_run_with_another_packing_or_tokenizer_is_refused_and_told_why(labelled, tiny_lm,
                                                                         tmp_path):
    tokenizer = tok.load(labelled / "tokenizer")
    fp = tok.fingerprint(labelled / "tokenizer")
    name, src = "docstrings", labelled / "shards" / "docstrings"
    with pytest.raises(ConfigError, match="seq_len 64 there, 32 here"):
        soft_labels.SourceSoftLabels(name, src, packed(labelled, seq_len=32), fp, len(tokenizer))
    with pytest.raises(ConfigError, match="tokenizer"):
        soft_labels.SourceSoftLabels(name, src, packed(labelled), "0123456789abcdef",
                                     len(tokenizer))
    bare = tmp_path / "bare"
    shutil.copytree(src / "train", bare / "train")
    with pytest.raises(ConfigError, match="no soft labels.*score.py.*soft_labels=64"):
        soft_labels.SourceSoftLabels(name, bare, packed(labelled), fp, len(tokenizer))
    train = Concat([packed(labelled, n) for n in SOURCES])
    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_lm, other)
    with pytest.raises(ConfigError, match="were made by"):
        soft_labels.for_run(train, SOURCES, [labelled / "shards" / n for n in SOURCES], fp,
                            len(tokenizer), str(other))


def test_offline_kd_trains_on_the_stored_labels_then_switches(labelled, tiny_lm, tmp_path):
    opts = {"teacher.kd_steps": 3, "teacher.chunk_size": 40, "train.max_steps": 5}
    offline = tmp_path / "offline"
    run_pretrain(tiny_overrides(labelled, offline, **opts, **{"teacher.soft_labels": "true"}))
    online = tmp_path / "online"
    run_pretrain(tiny_overrides(labelled, online, **opts, **{"teacher.path": str(tiny_lm)}))
    off, on = read_metrics(offline / "metrics.jsonl"), read_metrics(online / "metrics.jsonl")
    assert [r["kd_weight"] for r in off] == [0.5] * 3 + [0.0] * 2
    assert off[0]["ce"] == on[0]["ce"]  # same weights, same batch: the same CE
    # The student starts as a copy of the teacher (same seed and shape), so the teacher's top
    # 16 are the student's likeliest tokens too: the truncated cross-entropy is the lower.
    assert 0 < off[0]["kd"] < on[0]["kd"]
    assert not any("kd" in r for r in off[3:])

    refused = run_pretrain(tiny_overrides(labelled, tmp_path / "refused", **opts, **{
        "teacher.soft_labels": "true", "data.seq_len": 32}), check=False)
    assert refused.returncode != 0
    assert "seq_len 64 there, 32 here" in refused.stderr


def test_the_side_file_costs_what_the_spec_says_per_token(labelled):
    out = soft_labels.directory(labelled / "shards" / "docstrings", packed(labelled))
    meta = json.loads((out / "meta.json").read_text())
    size = sum(p.stat().st_size for p in out.glob("block_*.npy"))
    per_token = size / (meta["sequences"] * meta["seq_len"])
    assert per_token == pytest.approx(16 * (2 + 2), rel=0.02)  # uint16 id + fp16 log-prob
    assert np.dtype(meta["ids_dtype"]).itemsize == 2


@pytest.mark.slow
def test_offline_kd_resumes_exactly_inside_the_kd_phase_and_the_decay(labelled, tmp_path):
    opts = {"teacher.soft_labels": "true", "teacher.kd_steps": 3, "teacher.switch": "linear",
            "teacher.decay_steps": 2, "train.max_steps": 7, "train.checkpoint_every": 2}
    ref, cut = tmp_path / "reference", tmp_path / "interrupted"
    run_pretrain(tiny_overrides(labelled, ref, **opts))
    run_pretrain(tiny_overrides(labelled, cut, **opts, **{"train.stop_after": 2}))
    run_pretrain(tiny_overrides(labelled, cut, **opts, **{"train.stop_after": 2}))
    run_pretrain(tiny_overrides(labelled, cut, **opts))

    def per_step(run):
        return {r["step"]: (r["loss"], r["grad_norm"], r["kd_weight"])
                for r in read_metrics(run / "metrics.jsonl")}

    assert per_step(cut) == per_step(ref)
    assert [round(w, 3) for *_, w in per_step(ref).values()] == \
        [0.5, 0.5, 0.5, 0.333, 0.167, 0.0, 0.0]


def test_a_rollback_into_the_kd_phase_distils_from_the_stored_labels_again(labelled, tmp_path):
    rolled_back_into_the_kd_phase(labelled, tmp_path / "run", **{"teacher.soft_labels": "true"})
