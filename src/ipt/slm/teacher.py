"""The teacher: a small LM loaded frozen for online distillation.

Any local `transformers` causal LM folder: an ipt export is one, and an ipt run folder
stands for its export (`<run>/hf`). It must use the student's
tokenizer, token for token: distillation compares the two distributions id by id, so a
different vocabulary would teach nonsense. The check runs before anything is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ipt.config import ConfigError, TeacherConfig
from ipt.data import tokenizer as tok


def resolve(path: str | None) -> Path:
    """The model folder `path` names: itself, or an ipt run's export (`<run>/hf`)."""
    p = Path(path or "")
    if (p / "config.json").exists():
        return p
    if (p / "hf" / "config.json").exists():
        return p / "hf"
    if (p / "trainer_state.json").exists() or (p / "checkpoints").is_dir():
        raise ConfigError(f"teacher.path={path!r} is an ipt checkpoint or run without a "
                          f"Hugging Face export; export it first: python train/export_hf.py "
                          f"checkpoint={p} out={p}/hf")
    raise ConfigError(f"teacher.path={path!r} is not a model folder (no config.json)")


def check(cfg: TeacherConfig, tokenizer_dir: str) -> None:
    """Fail early, with the reason, on a teacher that cannot teach this student."""
    path = resolve(cfg.path)
    try:
        theirs = tok.load(path)
    except tok.TokenizerError as e:
        raise ConfigError(f"teacher.path={cfg.path!r} has no readable tokenizer; the teacher "
                          f"must ship the student's tokenizer ({e})") from e
    ours = tok.load(tokenizer_dir)
    if theirs.get_vocab() != ours.get_vocab():
        diff = len(set(theirs.get_vocab().items()) ^ set(ours.get_vocab().items()))
        raise ConfigError(f"teacher.path={cfg.path!r} uses another tokenizer than "
                          f"tokenizer={tokenizer_dir!r} ({len(theirs)} vs {len(ours)} tokens, "
                          f"{diff} entries differ); KD needs the same vocabulary")
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
    if vocab is None or vocab < len(ours):  # padding past the tokenizer is no token: KD
        # compares the tokenizer's rows
        raise ConfigError(f"teacher.path={cfg.path!r} has an output layer of {vocab} tokens; "
                          f"the tokenizer has {len(ours)}")


def load(cfg: TeacherConfig, device: torch.device, dtype: torch.dtype,
         zero3_micro_batch: int | None = None, kernel: str = "sdpa") -> Any:
    """The teacher on this rank, frozen: eval mode, no gradients, no optimizer state.

    `kernel`: the student's attention kernel (`ipt.attention`), or where it does not
    implement what the teacher's layers ask for, the fastest that does. With
    `zero3_micro_batch`
    (the student runs ZeRO-3) the teacher is loaded partitioned across the ranks
    (`ipt.zero3.partitioned`) and run by a DeepSpeed engine without an optimizer: each rank
    holds 1/world of it and gathers a layer's weights only while that layer runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ipt import attention
    from ipt.model import check_unembedding
    from ipt.zero3 import partitioned

    attention.register()  # the student's attention kernel, with its document masking
    needs = attention.needs(AutoConfig.from_pretrained(resolve(cfg.path)))
    if attention.why_not(kernel, device, dtype, training=False, model=needs) is not None:
        kernel = attention.choose("auto", device, dtype, training=False, model=needs)
    ds_config = None if zero3_micro_batch is None else {
        "train_micro_batch_size_per_gpu": zero3_micro_batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3}, "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 1 << 30}
    with partitioned(ds_config):  # under ZeRO-3 no rank holds the whole teacher
        model: Any = AutoModelForCausalLM.from_pretrained(
            resolve(cfg.path), dtype=dtype,
            attn_implementation=attention.registered_name(kernel))
    model.requires_grad_(False)
    model.eval()
    if ds_config is None:
        model = model.to(device)
    else:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        model = engine.module
    check_unembedding(model, f"teacher.path={cfg.path}")  # KD computes its logits so
    return model
