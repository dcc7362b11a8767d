"""Loss modules: given the model and a micro-batch, return the loss and what to log.

The trainer calls `loss_fn(model, batch, step, norm)` and back-propagates the returned loss
through the DeepSpeed engine; it knows nothing else about losses. A loss honours the
per-token side channels of a batch: `labels == IGNORE` positions (loss masks, document ends)
never count. Losses register here under the name their `configs/loss/*.yaml` gives
(multi-token prediction lives in `ipt.mtp`); distillation wraps whichever is configured
(`ipt.slm.kd`).

Weighting. A loss is a sum over target tokens divided by a denominator per term (one term for
next-token loss, one per head for multi-token prediction). Before a step's first forward the
trainer asks the loss for each micro-batch's target counts (`count_targets`, read off the
host batch), adds them up over the step's micro-batches and ranks, and hands every
micro-batch `norm[i] = count_i / (micro-batches x ranks)`. DeepSpeed then averages the
micro-batches' gradients over accumulation steps and ranks, so the step's gradient is that
of the sum over all its target tokens divided by their number: every token weighs the same,
whatever micro-batch it sits in, and the objective does not change with
`train.micro_batch_size` or the number of ranks. Without `norm` (evaluation, tests) a
micro-batch is normalised by its own counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ipt.config import ConfigError, LossConfig

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
        from ipt.attention import kernel_of, model_inputs

        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"],
                       **model_inputs(batch, kernel_of(model))).logits
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


def _ntp(cfg: LossConfig, eos_id: int | None) -> Loss:
    """Next-token loss as the one-head case of the fused unembedding and cross-entropy
    (`ipt.mtp.loss`): logits exist one chunk of positions at a time, and distillation
    mixes into the same pass. The model is wrapped with no extra heads
    (`ipt.mtp.heads.attach`)."""
    from dataclasses import replace

    from ipt.mtp.loss import MTPLoss

    return MTPLoss(replace(cfg, heads=1, weights=None, later_weights=None,
                           later_from_step=None, reduction="sum"), eos_id)


def _mtp(cfg: LossConfig, eos_id: int | None) -> Loss:
    from ipt.mtp.loss import MTPLoss

    return MTPLoss(cfg, eos_id)


LOSSES: dict[str, Callable[[LossConfig, int | None], Loss]] = {
    "ntp": _ntp,
    "mtp": _mtp,
}


def build_loss(cfg: LossConfig, eos_id: int | None = None) -> Loss:
    """The loss `cfg` names; `eos_id` ends documents in packed sequences (multi-token
    targets must not cross them)."""
    if cfg.name not in LOSSES:
        raise ConfigError(f"loss.name={cfg.name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[cfg.name](cfg, eos_id)
