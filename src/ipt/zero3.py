"""ZeRO-3 without a whole model on any rank: a checkpoint loaded straight into each rank's
partitions (`partitioned`), and what code that meets such a model needs: its parameters'
whole sizes (`numel`), and one module made whole for a moment (`whole`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def partitioned(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Under ZeRO-3 (`ds_config`, the run's DeepSpeed config, at stage 3), a causal LM loaded
    inside is partitioned across the ranks as it is built, so that no rank ever holds it
    whole: transformers' DeepSpeed integration builds it under `deepspeed.zero.Init`, and rank
    0 alone reads the checkpoint, copying it into the ranks' partitions one module at a time.
    Elsewhere (ZeRO-1/2, where every rank holds the model anyway, or None) nothing changes."""
    if ds_config is None or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # transformers holds it by a weak reference: alive for the load, and gone after it, so
    # nothing else (an evaluation copy, an export) is built partitioned
    keep = HfDeepSpeedConfig(ds_config)
    try:
        with _freed_memory_returned():
            yield
    finally:
        unset_hf_deepspeed_config()
        del keep


@contextlib.contextmanager
def _freed_memory_returned() -> Iterator[None]:
    """On a CPU-only machine, where the partitions live in host memory: each parameter is
    made whole, split, and its whole buffer freed, and glibc's malloc, whose threshold for
    giving a large buffer its own mapping grows as such buffers are freed, soon keeps them in
    its heap, never returned: the partitioned load then held as much memory as the whole
    model. A fixed threshold of 1 MiB (from here on) and a trim after the load keep what a
    rank holds at its partitions (bench/load_memory.py). A no-op elsewhere (no glibc, or a
    GPU, where the partitions are made on the device)."""
    libc = None
    if not torch.cuda.is_available() and sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


def numel(p: torch.Tensor) -> int:
    """A parameter's size, whole: a ZeRO-3 partition's own `numel()` is its shard's (or 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are ZeRO-3 partitions (built under `partitioned`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def whole(module: torch.nn.Module) -> Any:
    """A context in which `module`'s own parameters are whole on every rank: gathered where
    they are ZeRO-3 partitions (every rank enters it together), as they are elsewhere."""
    if not is_partitioned(module):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)))
