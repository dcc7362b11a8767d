"""Continual pre-training of a released checkpoint, end to end on 2 ranks, from a folder shaped
as Qwen2.5 ships (a byte-level BPE tokenizer without BOS, an embedding padded past the
tokenizer, tied embeddings, a sliding window configured but off as in its config.json): the
prepare stage, pre-training with MTP heads and KD from a teacher of the same tokenizer padded
otherwise, the export, loading it in transformers, and generating."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ipt.observe import read_metrics

from .conftest import bpe_tokenizer, run_entry, run_pretrain, tiny_overrides


def qwen25(tokenizer_dir: Path, out: Path, layers: int, padded_to: int) -> Path:
    """A random Qwen2.5-shaped model over the tokenizer, its vocabulary padded to a multiple
    of `padded_to`, saved with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = -(-len(tokenizer) // padded_to) * padded_to
    assert vocab > len(tokenizer)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, use_sliding_window=False,
                         sliding_window=32, max_window_layers=layers, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(layers)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_qwen25_shaped_folder_trains_end_to_end_on_two_ranks(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = bpe_tokenizer(data_dir, tmp_path / "tokenizer")
    student = qwen25(tokenizer_dir, tmp_path / "student", layers=2, padded_to=64)
    teacher = qwen25(tokenizer_dir, tmp_path / "teacher", layers=1, padded_to=256)
    sizes = [json.loads((m / "config.json").read_text())["vocab_size"] for m in (student,
                                                                               teacher)]
    assert sizes == [640, 768]  # one tokenizer of 600 tokens, padded two ways
    shards = tmp_path / "shards"
    prepared = run_entry("data_pipeline/prepare.py", [
        f"tokenizer={tokenizer_dir}", f"out={shards}", "valid_fraction=0.05",
        f"+sources.docstrings.path={data_dir / 'raw' / 'docstrings.jsonl'}",
        "progress_bar=never"])
    assert prepared.returncode == 0, prepared.stderr[-3000:]

    run = tmp_path / "run"
    run_pretrain(tiny_overrides(data_dir, run, **{
        "tokenizer": tokenizer_dir, "data": "custom",
        "data.sources": f"{{docstrings: {{path: {shards / 'docstrings'}, weight: 1.0}}}}",
        "model.init_from": student, "loss": "mtp", "loss.heads": 2,
        "teacher.path": teacher, "teacher.kd_steps": 2, "train.max_steps": 3,
        "train.eval_every": 3, "train.checkpoint_every": 3, "train.export_at_end": True}),
        nproc=2)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["kd_weight"] for r in rows] == [0.5, 0.5, 0.0]
    assert all(math.isfinite(r["ce"]) and math.isfinite(r["ce_2"]) for r in rows)
    assert all(math.isfinite(r["kd"]) for r in rows[:2])

    exported = AutoModelForCausalLM.from_pretrained(run / "hf")
    original = AutoModelForCausalLM.from_pretrained(student)
    assert exported.config.vocab_size == original.config.vocab_size  # the padding kept
    for key in ("use_sliding_window", "sliding_window", "layer_types", "tie_word_embeddings"):
        assert getattr(exported.config, key) == getattr(original.config, key), key
    assert (run / "hf" / "mtp_heads.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    prompt = tokenizer("Return the", return_tensors="pt").input_ids
    assert tokenizer.bos_token_id is None and prompt[0, 0] != tokenizer.eos_token_id
    out = exported.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 8
