"""Multi-token prediction: per-head targets, the fused loss against the naive one (alone, with
KD, and under DeepSpeed), checkpoint/resume/export of the heads, self-speculative decoding,
and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from ipt.checkpoint import CheckpointError, TrainerState, check_compatible
from ipt.config import ConfigError, LossConfig, ModelConfig, register, to_object, validate
from ipt.data.packing import assemble, pack_concat
from ipt.export import load_checkpoint
from ipt.losses import IGNORE, NextTokenLoss
from ipt.losses.fused import FusedLoss as MTPLoss
from ipt.losses.fused import head_targets
from ipt.losses.kd import KDTerm, online_probs
from ipt.model import build_model
from ipt.mtp import decode
from ipt.mtp.heads import HEADS_FILE, HeadsError, MTPModel, attach, load_heads, new_heads
from ipt.observe import read_metrics

from .conftest import ROOT, run_entry, run_pretrain, tiny_overrides

register()
BOS, EOS = 1, 2


def packed(doc_lens, seq_len, masked=()):
    """One packed sequence of documents (BOS ... EOS) made by the real packer, with a loss
    mask over the token positions `masked` (global indices into the concatenated docs)."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[BOS], rng.integers(3, 50, n - 2), [EOS]]) for n in doc_lens]
    tokens = np.concatenate(docs)
    starts = np.cumsum([0, *doc_lens[:-1]])
    mask = np.ones(len(tokens), dtype=np.uint8)
    mask[list(masked)] = 0
    out = assemble(tokens, starts, np.array(doc_lens), pack_concat(np.array(doc_lens), seq_len),
                   0, seq_len, 0, True, mask)
    doc = np.concatenate([np.full(n, d) for d, n in enumerate(doc_lens)])
    return out, tokens, doc, mask


def test_head_i_targets_token_t_plus_i_of_the_same_document_outside_loss_masks():
    out, tokens, doc, mask = packed([7, 12, 5], 32, masked=range(8, 13))
    ids, labels = torch.tensor(out["input_ids"])[None], torch.tensor(out["labels"])[None]
    targets = head_targets(ids, labels, 4, EOS)
    assert torch.equal(targets[0], labels)
    for k in range(1, 4):
        for t in range(32):
            j = t + k + 1  # the token head k + 1 predicts
            ok = j < len(tokens) and t < len(tokens) and doc[j] == doc[t] and mask[j]
            assert targets[k, 0, t] == (tokens[j] if ok else IGNORE), (k, t)
    # head 3 at the masked span's last context tokens still reaches the first target token
    assert targets[2, 0, 10] == tokens[13] != IGNORE


def tiny_mtp(extra: int, vocab: int = 300, layers: int = 3,
             head_type: str = "parallel") -> MTPModel:
    torch.manual_seed(0)
    lm = build_model(ModelConfig(name="t", hidden_size=48, intermediate_size=96,
                                 num_layers=layers, num_heads=4, num_kv_heads=2,
                                 max_seq_len=128), vocab)
    return attach(lm, extra, None, head_type)


def batch_of(vocab: int = 300):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (2, 48))
    ids[0, 17], ids[1, 30] = EOS, EOS
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE
    labels[0, 17] = labels[1, 30] = IGNORE
    labels[1, 5:12] = IGNORE  # a loss mask
    pos = torch.arange(48).repeat(2, 1)
    pos[0, 18:] -= 18
    pos[1, 31:] -= 31
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


@pytest.mark.parametrize("cfg", [
    {"reduction": "mean"}, {"reduction": "sum", "weights": [1.0, 0.5, 0.25, 0.0]},
    {"kd": True}, {"masked_chunk": True}, {"bf16": True, "kd": True},
    {"head_type": "sequential", "kd": True}],
    ids=["mean", "weighted-sum", "with-kd-on-head-1", "a-chunk-without-targets", "bf16",
         "sequential"])
def test_the_fused_loss_equals_all_heads_at_once_with_its_gradients(cfg):
    model, batch = tiny_mtp(3, head_type=cfg.get("head_type", "parallel")), batch_of()
    teacher, h_t = torch.nn.Linear(48, 300, bias=False), torch.randn(2, 48, 48)
    if cfg.get("masked_chunk"):
        batch["labels"][0, :44] = IGNORE  # positions 0-39: the first 2 chunks of 20, every head
    if cfg.get("bf16"):
        model, teacher, h_t = model.bfloat16(), teacher.bfloat16(), h_t.bfloat16()
    rel = 2e-2 if cfg.get("bf16") else 1e-5
    results = []
    for efficient in (True, False):
        model.zero_grad()
        loss = MTPLoss(LossConfig(name="mtp", heads=4, memory_efficient=efficient,
                                  chunk_size=20, weights=cfg.get("weights"),
                                  reduction=cfg.get("reduction", "mean")), EOS)
        kd = None
        if cfg.get("kd"):
            kd = KDTerm(online_probs(h_t, teacher, 2.0), 2.0, 0.4)
        out = loss(model, batch, 0, kd=kd)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out, grads))
    (fused, g_fused), (naive, g_naive) = results
    assert fused.loss.item() == pytest.approx(naive.loss.item(), rel=rel)
    assert {k: float(v) for k, v in fused.metrics.items()} == pytest.approx(
        {k: float(v) for k, v in naive.metrics.items()}, rel=rel)
    assert set(fused.metrics) >= {"ce", "ce_2", "ce_3", "ce_4"} | ({"kd"} if kd else set())
    for name, g in g_naive.items():
        if cfg.get("bf16"):  # bf16 rounding differs between the two: compare the whole tensor
            assert (g_fused[name].float() - g.float()).norm() <= rel * g.float().norm(), name
        else:
            torch.testing.assert_close(g_fused[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for k, g in g_naive.items() if "mtp_heads.1." in k)


def test_a_sequential_module_at_depth_k_sees_the_true_tokens_up_to_t_plus_k():
    model = tiny_mtp(2, head_type="sequential").eval()
    ids = torch.randint(3, 300, (1, 24))
    t = 10
    with torch.no_grad():
        base = model.hidden(ids)
        for k in (1, 2):  # depth k predicts t + k + 1 from tokens up to t + k
            for j, changes in ((t + k, True), (t + k + 1, False)):
                other = ids.clone()
                other[0, j] = (other[0, j] + 1) % 300
                moved = not torch.allclose(model.hidden(other)[k][0, t], base[k][0, t])
                assert moved == changes, (k, j)
        assert torch.equal(model.hidden(ids)[0], base[0])  # head 1 is the plain model


def test_the_head_weights_switch_at_later_from_step():
    cfg = LossConfig(name="mtp", heads=2, weights=[1.0, 0.3], later_weights=[1.0, 0.1],
                     later_from_step=100, head_type="sequential", reduction="sum")
    loss = MTPLoss(cfg, EOS)
    assert loss.weights_at(0) == loss.weights_at(99) == [1.0, 0.3]
    assert loss.weights_at(100) == [1.0, 0.1]


def test_the_fused_loss_keeps_no_logits_for_the_backward():
    """At a 32k vocabulary, the saved state of a step is hidden-sized: only the gradients for
    the hidden states and the unembedding, never [heads, positions, vocab]."""
    model = tiny_mtp(3, vocab=32000, layers=2)
    batch = batch_of(32000)
    loss = MTPLoss(LossConfig(name="mtp", heads=4, chunk_size=16), EOS)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        loss(model, batch, 0)
    logits_size = 2 * 48 * 32000
    assert max(saved) < logits_size  # the largest is the unembedding's own gradient buffer


def test_eval_loss_is_the_next_token_loss_of_head_1_alone():
    model, batch = tiny_mtp(2), batch_of()
    with torch.no_grad():
        out = MTPLoss(LossConfig(name="mtp", heads=3), EOS)(model, batch, 0)
        plain = NextTokenLoss()(model.lm, batch, 0)
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-5)
    assert out.tokens == plain.tokens and "ce_2" not in out.metrics  # the heads stay idle


@pytest.mark.parametrize(("nproc", "stage"), [
    (1, 1), pytest.param(2, 2, marks=pytest.mark.slow),
    pytest.param(2, 3, marks=pytest.mark.slow)], ids=["1rank-zero1", "2ranks-zero2",
                                                      "2ranks-zero3"])
def test_under_deepspeed_the_fused_loss_trains_like_the_naive_one(data_dir, tmp_path, nproc,
                                                                  stage):
    """Gradient accumulation (4 or 2 micro-batches) and clipping (active: the norms exceed
    it) see the same gradients, step after step."""
    opts = {"loss": "mtp", "loss.heads": 3, "loss.chunk_size": 40, "deepspeed.stage": stage,
            "train.max_steps": 4, "optim.grad_clip": 0.4, "train.eval_every": 2}
    runs = {}
    for efficient in (True, False):
        run = tmp_path / f"efficient-{efficient}"
        run_pretrain(tiny_overrides(data_dir, run, **opts,
                                    **{"loss.memory_efficient": efficient}), nproc)
        runs[efficient] = read_metrics(run / "metrics.jsonl")
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["grad_norm"] > 0.4  # clipped: the demo corpus gives 0.49 and more
        for key in ("loss", "ce", "ce_2", "ce_3", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5), (a["step"], key)
    assert [r["val_loss"] for r in runs[True] if "val_loss" in r] == \
        pytest.approx([r["val_loss"] for r in runs[False] if "val_loss" in r], rel=2e-5)


@pytest.fixture(scope="module")
def mtp_run(data_dir, tmp_path_factory):
    """A tiny model trained with 3 heads, checkpointed and exported."""
    run = tmp_path_factory.mktemp("mtp") / "run"
    run_pretrain(tiny_overrides(data_dir, run, **{
        "loss": "mtp", "loss.heads": 3, "train.max_steps": 30, "train.checkpoint_every": 10,
        "train.eval_every": 10, "train.export_at_end": True, "model.num_layers": 3}))
    return run


def test_heads_are_exported_beside_a_plain_causal_lm(mtp_run):
    hf = mtp_run / "hf"
    lm = AutoModelForCausalLM.from_pretrained(hf)  # no custom code, no stray keys
    assert type(lm).__name__ == "LlamaForCausalLM" and (hf / HEADS_FILE).is_file()
    assert json.loads((hf / "mtp_config.json").read_text())["heads"] == 3
    heads = load_heads(hf, lm)
    _, saved = load_checkpoint(mtp_run / "checkpoints")
    for name, p in heads.state_dict().items():
        assert torch.equal(p, saved[f"mtp_heads.{name}"])


@pytest.mark.slow
def test_resume_with_heads_is_exact(data_dir, tmp_path):
    opts = {"loss": "mtp", "loss.heads": 2, "train.max_steps": 6, "train.checkpoint_every": 2}
    ref, cut = tmp_path / "reference", tmp_path / "interrupted"
    run_pretrain(tiny_overrides(data_dir, ref, **opts))
    run_pretrain(tiny_overrides(data_dir, cut, **opts, **{"train.stop_after": 3}))
    run_pretrain(tiny_overrides(data_dir, cut, **opts))

    def per_step(run):
        return {r["step"]: (r["loss"], r["ce_2"], r["grad_norm"])
                for r in read_metrics(run / "metrics.jsonl")}

    assert per_step(cut) == per_step(ref)


def check_speculative(model, prompt, max_new, eos):
    ids = torch.tensor([prompt])
    spec = decode.self_speculative(model, ids, max_new, eos)
    plain = decode.greedy(model.lm, ids, max_new, eos)
    reference = model.lm.generate(ids, max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)[0, len(prompt):]
    assert spec.tokens == plain.tokens == reference.tolist()
    assert len(spec.tokens) - sum(spec.accepted) in (0, 1)  # the last may need no verifying
    assert all(1 <= a <= model.n for a in spec.accepted)
    assert spec.forwards == len(spec.accepted) + 1 <= plain.forwards
    return spec


def test_self_speculative_decoding_is_greedy_decoding_in_fewer_forwards(mtp_run):
    model = decode.load(mtp_run / "hf")
    for prompt in ([BOS, 40, 41, 42], [BOS, 7], [BOS, 100, 3, 250, 17, 9]):
        check_speculative(model, prompt, 30, EOS)


def test_rejected_drafts_are_cropped_and_the_output_stays_greedy(mtp_run):
    """Heads that draft noise: most steps reject, and the caches must be cut back. (A fresh
    head alone drafts like an early exit of the model, often right: its MLP is scaled up so
    its own random output dominates.)"""
    model = decode.load(mtp_run / "hf")
    torch.manual_seed(3)
    model.mtp_heads = new_heads(model.lm, 2)
    with torch.no_grad():
        for head in model.mtp_heads:
            head.mlp.down_proj.weight.mul_(1000)
    rejected = 0
    for max_new in (1, 2, 3, 4, 17):
        spec = check_speculative(model, [BOS, 40, 41, 42], max_new, EOS)
        rejected += sum(a < model.n for a in spec.accepted)
    assert rejected >= 10  # the crop path ran, again and again
    # an EOS mid-way ends both at the same token (a token greedy produces stands in for it)
    eos = decode.greedy(model.lm, torch.tensor([[BOS, 7]]), 12, None).tokens[6]
    spec = check_speculative(model, [BOS, 7], 30, eos)
    assert spec.tokens[-1] == eos and len(spec.tokens) <= 7


def test_the_sample_cli_compares_speculative_with_greedy(mtp_run):
    proc = run_entry("train/sample.py", [f"model={mtp_run / 'hf'}", "prompt=Return the",
                                         "max_new_tokens=12"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speculative == greedy: True" in proc.stdout
    assert "tokens per verifying forward" in proc.stdout


@pytest.mark.slow
def test_under_zero3_kd_on_head_1_trains_like_the_naive_loss(tiny_lm, data_dir, tmp_path):
    """The teacher sharded by ZeRO-3 runs inside the student's fused loss: every rank still
    joins every gather, and the result is the naive loss's."""
    opts = {"loss": "mtp", "loss.heads": 2, "loss.chunk_size": 40, "deepspeed.stage": 3,
            "train.max_steps": 3, "teacher.path": str(tiny_lm), "teacher.kd_steps": 3}
    runs = {}
    for efficient in (True, False):
        run = tmp_path / f"efficient-{efficient}"
        proc = run_pretrain(tiny_overrides(data_dir, run, **opts,
                                           **{"loss.memory_efficient": efficient}), nproc=2)
        assert "sharded with ZeRO-3" in proc.stderr
        runs[efficient] = read_metrics(run / "metrics.jsonl")
    for a, b in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "ce", "ce_2", "kd", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5), (a["step"], key)


def test_sequential_modules_train_export_and_decode_greedily(data_dir, tmp_path):
    run = tmp_path / "run"
    run_pretrain(tiny_overrides(data_dir, run, **{
        "loss": "mtp_sequential", "train.max_steps": 4, "train.export_at_end": True,
        "loss.later_weights": "[1.0,0.1]", "loss.later_from_step": 2}))
    rows = read_metrics(run / "metrics.jsonl")
    assert all(r["loss"] == pytest.approx(r["ce"] + (0.3 if r["step"] <= 2 else 0.1)
                                          * r["ce_2"], rel=1e-4) for r in rows)
    hf = run / "hf"
    assert json.loads((hf / "mtp_config.json").read_text())["head_type"] == "sequential"
    lm = AutoModelForCausalLM.from_pretrained(hf)
    heads = load_heads(hf, lm)
    _, saved = load_checkpoint(run / "checkpoints")
    assert all(torch.equal(p, saved[f"mtp_heads.{n}"]) for n, p in heads.state_dict().items())
    with pytest.raises(HeadsError, match="built for parallel heads only"):
        decode.load(hf)
    proc = run_entry("train/sample.py", [f"model={hf}", "max_new_tokens=5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[{hf}, greedy]" in proc.stdout and "speculative" not in proc.stdout


def test_mtp_composes_with_kd_on_the_next_token_head(tiny_lm, data_dir, tmp_path):
    run = tmp_path / "run"
    run_pretrain(tiny_overrides(data_dir, run, **{
        "loss": "mtp", "loss.heads": 2, "train.max_steps": 4, "teacher.path": str(tiny_lm),
        "teacher.kd_steps": 2}))
    rows = read_metrics(run / "metrics.jsonl")
    assert all({"kd", "ce", "ce_2"} <= set(r) for r in rows[:2])
    assert all("kd" not in r and "ce_2" in r for r in rows[2:])


def load_cfg(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        return to_object(compose("pretrain", overrides=overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss=mtp", "loss.heads=0"], "loss.heads=0: there must be at least one head"),
    (["loss.heads=2"], "loss.heads=2 needs loss=mtp"),
    (["loss=mtp", "loss.heads=2", "loss.weights=[1.0]"], "one weight >= 0 per head"),
    (["loss=mtp", "loss.head_type=serial"], "loss.head_type='serial'"),
    (["loss=mtp_sequential", "loss.later_weights=[1.0,0.1]"], "go together"),
    (["loss=mtp_sequential", "loss.later_weights=[1.0,0.1]", "loss.later_from_step=-1"],
     "loss.later_from_step=-1 must be >= 0"),
])
def test_a_bad_heads_config_is_refused_with_the_reason(data_dir, overrides, message):
    cfg = load_cfg([f"data.root={data_dir}", *overrides])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate(cfg, 1)


def test_decoding_a_model_without_heads_is_refused(tiny_lm):
    with pytest.raises(HeadsError, match="has no MTP heads"):
        decode.load(tiny_lm)
    proc = run_entry("train/sample.py", [f"model={tiny_lm}", "decode=speculative"])
    assert proc.returncode == 1 and "has no MTP heads" in proc.stderr.splitlines()[-1]


def test_heads_of_another_model_shape_are_refused(mtp_run, tmp_path):
    for field, value, message in (("hidden_size", 32, "made for hidden_size=64"),
                                  ("intermediate_size", 64, "do not fit this model's shape")):
        lm = AutoModelForCausalLM.from_pretrained(mtp_run / "hf")
        setattr(lm.config, field, value)
        other = AutoModelForCausalLM.from_config(lm.config)
        with pytest.raises(HeadsError, match=message):
            load_heads(mtp_run / "hf", other)


def test_resuming_a_run_with_another_head_count_or_type_is_refused():
    saved = TrainerState(model_config={"hidden_size": 64})  # made before heads existed: none
    with pytest.raises(CheckpointError, match="mtp_heads: checkpoint 0 vs config 2"):
        check_compatible(saved, {"hidden_size": 64, "mtp_heads": 2}, ROOT)
    saved.model_config |= {"mtp_heads": 1, "mtp_head_type": "parallel"}
    with pytest.raises(CheckpointError, match="mtp_head_type: checkpoint parallel vs config "
                                              "sequential"):
        check_compatible(saved, {"hidden_size": 64, "mtp_heads": 1,
                                 "mtp_head_type": "sequential"}, ROOT)


def test_new_heads_are_the_models_own_block_type_and_init():
    model = tiny_mtp(2)
    heads = new_heads(model.lm, 1)
    assert type(heads[0]) is type(model.lm.model.layers[-1])
    std = heads[0].mlp.down_proj.weight.std().item()
    assert std == pytest.approx(model.config.initializer_range, rel=0.2)


@pytest.mark.parametrize("kd", [False, True], ids=["heads", "heads-with-kd"])
def test_micro_batches_given_the_steps_norm_weigh_every_heads_tokens_alike(kd):
    """Two micro-batches with unequal target counts, each divided by the step's count per
    head (the trainer's `norm`), average to the loss and gradient of the two as one batch."""
    model, batch = tiny_mtp(2), batch_of()
    batch["labels"][0, 3:40] = IGNORE  # row 0: far fewer targets than row 1
    teacher, h_t = torch.nn.Linear(48, 300, bias=False), torch.randn(2, 48, 48)
    loss = MTPLoss(LossConfig(name="mtp", heads=3, chunk_size=20), EOS)

    def run(part: dict, norm=None):
        probs = online_probs(h_t[part["rows"]], teacher, 2.0) if kd else None
        out = loss(model, {k: v[part["rows"]] for k, v in part["batch"].items()}, 0, norm,
                   kd=KDTerm(probs, 2.0, 0.4) if kd else None)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, g_whole = run({"batch": batch, "rows": slice(None)})
    model.zero_grad()
    halves = [{"batch": batch, "rows": slice(r, r + 1)} for r in (0, 1)]
    counts = [loss.count_targets({k: v[h["rows"]] for k, v in batch.items()}) for h in halves]
    norm = [sum(c) / 2 for c in zip(*counts, strict=True)]
    parts = [run(h, norm) for h in halves]
    assert (parts[0][0] + parts[1][0]) / 2 == pytest.approx(whole, rel=1e-5)
    for name, g in g_whole.items():  # the second run's grads hold both micro-batches' sum
        torch.testing.assert_close(parts[1][1][name] / 2, g, rtol=1e-4, atol=1e-7, msg=name)
