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


def export_on_a_slow_disk(data_dir: Path, run: Path, how: str, seconds: float, timeout: int):
    """A 2-rank run whose export at the end meets a slow file system
    (`tests/workers/slow_export.py`); rank 1 waits for rank 0 meanwhile."""
    return run_entry("tests/workers/slow_export.py", tiny_overrides(data_dir, run, **{
        "train.export_at_end": True, "train.eval_every": 0, "train.max_steps": 2,
        "train.hang_timeout_s": timeout}), nproc=2,
        env={"SLOW_EXPORT": how, "SLOW_EXPORT_S": str(seconds)}, timeout=120)


@pytest.mark.slow
def test_an_export_slower_than_the_hang_timeout_finishes_while_it_writes(data_dir, tmp_path):
    timeout = 3
    proc = export_on_a_slow_disk(data_dir, tmp_path / "run", "trickle", 3 * timeout, timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    took = float(proc.stderr.split(" to ")[-1].split(" in ")[1].split(" s")[0])
    assert took > 2 * timeout
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").num_parameters() > 0


@pytest.mark.slow
def test_an_export_stuck_on_its_file_system_ends_the_job_within_the_hang_timeout(data_dir,
                                                                                 tmp_path):
    proc = export_on_a_slow_disk(data_dir, tmp_path / "run", "stuck", 0, 3)
    assert proc.returncode != 0
    assert "rank 0: no progress for" in proc.stderr and "in rank 0's export" in proc.stderr
    # rank 1 ends on its own watchdog, or, when rank 0 ended the job first, says so
    assert ("rank 1: no progress for" in proc.stderr or "rank 1: rank 0 ended" in proc.stderr) \
        and "waiting for rank 0's export" in proc.stderr
