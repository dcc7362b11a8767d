"""Export: any checkpoint (ZeRO-3 included) to a Hugging Face folder that `transformers` loads
with no custom code: safetensors weights, config, tokenizer files (and MTP heads aside)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from ipt import checkpoint, quiet
from ipt.checkpoint import CheckpointError
from ipt.health import Solo
from ipt.techniques import TECHNIQUES, state_prefixes

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the newest usable one of a `checkpoints/` folder."""
    p = Path(path)
    if (p / checkpoint.MARKER).exists() or (p / "trainer_state.json").exists():
        why = checkpoint.problem(p)
        if why:
            raise CheckpointError(f"{p} is not a usable checkpoint: {why}")
        return p
    found = checkpoint.usable_checkpoints(p)
    if not found:
        raise CheckpointError(f"no usable checkpoint in {p}")
    return found[0]


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights: gathered from ZeRO partitions when there are any."""
    if any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # it prints each stage of the consolidation, and a progress bar
        with quiet.prints_to_log(log, stderr=True):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def load_checkpoint(ckpt: str | Path) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """The trained causal LM of a checkpoint, as a plain `transformers` module in fp32, and
    the weights that are its techniques' (the extra MTP heads, `mtp_heads.*`; empty without
    them)."""
    return _load(resolve_checkpoint(ckpt))


def _load(path: Path) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    config = AutoConfig.from_pretrained(path / "hf_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = consolidated_state_dict(path)
    owned = state_prefixes()
    extra = {k: state.pop(k) for k in [k for k in state if k.startswith(owned)]}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a checkpoint may keep a tied output embedding under the input embedding's name alone
    head = model.get_output_embeddings()
    tied = {f"{name}.weight" for name, m in model.named_modules()
            if m is head} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{path} does not fit its model config: missing {missing}, "
                              f"unexpected {unexpected}")
    model.tie_weights()
    return model.eval(), extra


def load_checkpoint_model(ckpt: str | Path) -> PreTrainedModel:
    return load_checkpoint(ckpt)[0]


def export_hf(ckpt: str | Path, out: str | Path, tokenizer_dir: str | Path) -> Path:
    """A Hugging Face folder `transformers` loads as it is; what a technique keeps, it writes
    beside it (MTP heads, if the model has any: `mtp_heads.safetensors`, `mtp_config.json`)."""
    out = Path(out)
    path = resolve_checkpoint(ckpt)
    model, extra = _load(path)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, safe_serialization=True)
    run_config = checkpoint.read_state(path).config
    for kind in TECHNIQUES.values():
        kind.export({k: v for k, v in extra.items() if kind.state_prefix
                     and k.startswith(kind.state_prefix)}, model.config, tmp, run_config)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class ExportAtEnd:
    """Trainer callback: after the final checkpoint, rank 0 writes the Hugging Face folder
    while the other ranks wait (`ipt.health.Solo`: a large model on a slow file system may
    take longer than `train.hang_timeout_s`; the watchdogs go on as long as the export reads
    or writes)."""

    def __init__(self, ckpt_root: Path, out: Path, tokenizer_dir: str) -> None:
        self.ckpt_root, self.out, self.tokenizer_dir = ckpt_root, out, tokenizer_dir
        self.solo = Solo("export")

    def on_start(self, trainer: Any) -> None:
        self.solo.start(trainer.dist.world_size, trainer.watchdog)

    def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        pass

    def on_end(self, trainer: Any) -> None:
        if not trainer.finished:
            return  # stopped early: the run is not over
        if not trainer.dist.is_main:
            self.solo.wait(trainer.watchdog)
            return
        path = self.ckpt_root / checkpoint.tag_for(trainer.state.step)
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar per shard of a seconds-long step
        start = time.perf_counter()
        try:
            with self.solo.work(trainer.watchdog):
                export_hf(path, self.out, self.tokenizer_dir)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        log.info("exported %s to %s in %.1f s", path, self.out, time.perf_counter() - start)
