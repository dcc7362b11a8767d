"""Export: `transformers` loads the folder with no custom code, its logits equal the trainer's
model on the same input, and it generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipt.export import load_checkpoint_model

from .conftest import run_entry, run_pretrain, tiny_overrides


@pytest.fixture(scope="module", params=[1, 3], ids=["zero1", "zero3-2ranks"])
def trained(request, data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / f"zero{request.param}"
    nproc = 2 if request.param == 3 else 1
    run_pretrain(tiny_overrides(data_dir, run_dir, **{"deepspeed.stage": request.param,
                                                      "train.export_at_end": True,
                                                      "logger.plot": True}), nproc=nproc)
    return run_dir


def test_run_ends_with_an_export_and_a_plot(trained):
    assert (trained / "hf" / "model.safetensors").exists()
    assert (trained / "hf" / "tokenizer.json").exists()
    assert (trained / "loss.png").stat().st_size > 1000


def test_export_logits_match_the_checkpointed_model(trained):
    ours = load_checkpoint_model(trained / "checkpoints")
    hf = AutoModelForCausalLM.from_pretrained(trained / "hf")
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_checkpoint_weights_differ_from_initialisation(trained):
    """The export carries trained weights, not the model's random init."""
    torch.manual_seed(0)
    ours = load_checkpoint_model(trained / "checkpoints")
    fresh = AutoModelForCausalLM.from_config(ours.config)
    assert not torch.equal(ours.model.norm.weight, fresh.model.norm.weight)


def test_exported_tokenizer_round_trips_text(trained):
    tok = AutoTokenizer.from_pretrained(trained / "hf")
    text = "Return the number of items.\n    Indented line."
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_exported_model_generates(trained):
    model = AutoModelForCausalLM.from_pretrained(trained / "hf")
    tok = AutoTokenizer.from_pretrained(trained / "hf")
    ids = tok("Return the", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_export_cli_writes_a_loadable_folder(trained, tmp_path):
    out = tmp_path / "cli-export"
    proc = run_entry("train/export_hf.py", [
        f"checkpoint={trained / 'checkpoints' / 'step_00000004'}", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 64


def test_export_cli_names_a_missing_checkpoint(tmp_path):
    proc = run_entry("train/export_hf.py", [f"checkpoint={tmp_path}", f"out={tmp_path / 'o'}"])
    assert proc.returncode == 2 and "no usable checkpoint" in proc.stderr
