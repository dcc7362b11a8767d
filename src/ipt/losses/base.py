"""What every loss shares: the ignore label, the output, the protocol the trainer calls, and
the reference next-token loss. How a step's terms are weighted: `ipt.losses`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class LossOutput:
    """What a loss returns. Metrics stay on the device (0-d tensors, or plain numbers): the
    trainer adds them up there and reads them once per logging interval, so no micro-batch
    waits on the host."""

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    tokens: Any = 0  # target tokens that counted (an int, or a 0-d tensor on the device)


class Loss(Protocol):
    """What the trainer needs of a loss module."""

    def count_targets(self, batch: dict[str, torch.Tensor]) -> list[int]: ...

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], step: int,
                 norm: Sequence[float] | None = None) -> LossOutput: ...


def target_count(labels: torch.Tensor) -> int:
    """Targets in host labels (the trainer counts before a batch moves to the device)."""
    return int((labels != IGNORE).sum())


class NextTokenLoss:
    """Cross-entropy of the next token over the positions that have a target, summed and
    divided by `norm[0]` (see the module's docstring), from a plain causal LM's logits.

    This is the reference: it builds the [batch, seq, vocab] logits and their fp32 copy. The
    trainer's `loss=ntp` is the fused one (`_ntp`), which never does."""

    def count_targets(self, batch: dict[str, torch.Tensor]) -> list[int]:
        return [target_count(batch["labels"])]

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int,
                 norm: Sequence[float] | None = None) -> LossOutput:
        from ipt.attention import model_inputs

        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"],
                       **model_inputs(batch, model)).logits
        tokens = (labels != IGNORE).sum()
        # A micro-batch whose every token is masked (all context, in SFT data) gives 0 with a
        # graph, not a NaN.
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE, reduction="sum") / denominator(norm, tokens)
        return LossOutput(loss, {"ce": loss.detach()}, tokens)


def denominator(norm: Sequence[float] | None, count: torch.Tensor) -> Any:
    """What a one-term loss of a micro-batch is divided by: the step's share from the
    trainer, else the micro-batch's own target count (on the device: no sync)."""
    return norm[0] if norm is not None else count.clamp(min=1)
