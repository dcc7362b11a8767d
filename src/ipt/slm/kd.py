"""Distillation from a small LM (SALT, stage 1), as a loss module.

    L = (1 - w) * CE(student, labels) + w * KD(teacher -> student)

KD is the token-level cross-entropy of the student's softmax against the teacher's, both at
temperature tau, scaled by tau^2 (so its gradient does not shrink as tau grows). Only
positions with a target count, so loss masks and document ends are honoured by both parts.

Memory: the student's logits come from its ordinary forward (through the DeepSpeed engine,
which under ZeRO-3 must see the whole forward to gather parameters and scale gradients).
The loss and its gradient with respect to those logits are computed together, over chunks
of `chunk_size` positions: the teacher's logits and the fp32 softmaxes exist one chunk at a
time, and what is kept for the backward is the gradient itself (the size of the logits, in
their dtype; autograd would build it anyway). Nothing is recomputed.

`w` follows the step (`kd_weight`): KD for the first `kd_steps`, then a hard switch, or a
linear decay to 0 over `decay_steps`. Once it is 0 for good, the teacher is released and the
loss is plain next-token loss, at no further cost.

The teacher is online (its forward runs in the step) or offline: its top-K log-probabilities
per token, written once by the scoring stage (`ipt.slm.soft_labels`), arrive with the batch.
Either way the loss sees the teacher as a function giving its distribution for a chunk.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ipt.attention import kernel_of, model_inputs
from ipt.config import TeacherConfig
from ipt.losses import IGNORE, Loss, LossOutput, denominator

log = logging.getLogger(__name__)


def kd_weight(cfg: TeacherConfig, step: int) -> float:
    """w at optimizer step `step` (0-based): a pure function, so resume is exact."""
    if step < cfg.kd_steps:
        return cfg.weight
    if cfg.switch == "linear" and step < cfg.kd_steps + cfg.decay_steps:
        return cfg.weight * (1 - (step - cfg.kd_steps + 1) / (cfg.decay_steps + 1))
    return 0.0


TeacherProbs = Callable[[slice, Any], torch.Tensor]
"""The teacher's softmax at temperature tau, fp32 [targets, vocab], for the rows `rows` (a
mask, or a slice) of the flat positions `sl`."""


def online_probs(h_t: torch.Tensor, head_t: torch.nn.Module, tau: float) -> TeacherProbs:
    """From the teacher's last hidden states: its output layer runs one chunk at a time."""
    flat = h_t.detach().flatten(0, 1)

    def probs(sl: slice, rows: Any) -> torch.Tensor:
        # Every chunk runs the output layer, even one with no target: under ZeRO-3 each
        # call gathers its weight, a collective all ranks must join.
        logits = head_t(flat[sl][rows]).float()
        return F.softmax(logits if tau == 1.0 else logits / tau, dim=-1)

    return probs


def offline_probs(ids: torch.Tensor, logp: torch.Tensor, vocab: int,
                  tau: float) -> TeacherProbs:
    """From stored top-K log-probabilities [batch, seq, K]: the teacher's distribution
    restricted to its top K, renormalised (what truncation leaves), zero elsewhere."""
    flat_ids, flat_logp = ids.flatten(0, 1), logp.flatten(0, 1)

    def probs(sl: slice, rows: Any) -> torch.Tensor:
        top = F.softmax(flat_logp[sl][rows].float() / tau, dim=-1)
        dense = torch.zeros(len(top), vocab, dtype=torch.float32, device=top.device)
        return dense.scatter_(1, flat_ids[sl][rows], top)

    return probs


def chunk_grad(s: torch.Tensor, y: torch.Tensor, p_t: torch.Tensor | None, tau: float,
               w: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one chunk of fp32 logits `s` [rows, vocab] with targets `y` (IGNORE: the row has
    none): the CE sum, the KD sum against the teacher's distribution `p_t` (None: no teacher,
    w must be 0) and the gradient of (1 - w) * CE + w * KD with respect to `s` (which it
    overwrites), zero in rows without a target.

    Rows without a target are computed and then masked, not filtered out: filtering needs
    their number on the host, a sync that stalls the GPU once per chunk. Fewest passes over
    [rows, vocab]: dot products for the sums, in-place updates.
    """
    keep = y != IGNORE
    y = y.clamp(min=0)
    weight = keep.to(s.dtype)
    log_p = F.log_softmax(s, dim=-1)
    ce = -(log_p.gather(1, y[:, None]).squeeze(1) @ weight).double()
    kd = torch.zeros((), dtype=torch.float64, device=s.device)
    if p_t is None:  # plain CE: p - onehot
        g = log_p.exp_()
    elif tau == 1.0:  # q = p: the gradient is p - w * p_t
        kd = -(((p_t * log_p).sum(-1)) @ weight).double()
        g = log_p.exp_().sub_(p_t, alpha=w)
    else:  # (1 - w) p + w tau (q - p_t)
        log_q = F.log_softmax(s / tau, dim=-1)
        kd = -(((p_t * log_q).sum(-1)) @ weight).double() * tau**2
        g = log_p.exp_().mul_(1 - w).add_(log_q.exp_().sub_(p_t), alpha=w * tau)
    g[torch.arange(len(y), device=g.device), y] -= 1 - w
    return ce, kd, g.mul_(weight[:, None])


class _MixedLoss(torch.autograd.Function):
    """(1 - w) * CE + w * KD summed over target positions, with d/d(logits) computed in the
    forward, one chunk of positions at a time, and kept for the backward.

    The gradient is the size of the logits (autograd would make that tensor in the backward
    anyway), in their dtype; everything else (fp32 softmaxes, the teacher's distribution)
    exists one chunk at a time, and nothing is recomputed.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherProbs,
                tau: float, w: float,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat, y_all = logits.detach().flatten(0, 1), labels.flatten()
        grad = torch.empty_like(flat)
        ce = torch.zeros((), dtype=torch.float64, device=flat.device)
        kd = torch.zeros_like(ce)
        for a in range(0, len(flat), chunk_size):
            sl = slice(a, a + chunk_size)
            c_ce, c_kd, g = chunk_grad(flat[sl].float(), y_all[sl], teacher(sl, slice(None)),
                                       tau, w)
            ce += c_ce
            kd += c_kd
            grad[sl] = g
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        mixed = ((1 - w) * ce + w * kd).float()
        ctx.mark_non_differentiable(ce, kd)
        return mixed, ce.float(), kd.float()

    @staticmethod
    def backward(ctx: Any, g_mixed: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        # In place: the buffer is this backward's alone (the graph is not retained).
        return grad.mul_(g_mixed).view(ctx.shape), None, None, None, None, None


def kd_losses(logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherProbs, tau: float,
              w: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """(mixed sum, CE sum, KD sum, target count) over the positions of `labels` that have
    a target; only the mixed sum carries a gradient (to the student's logits)."""
    mixed, ce, kd = _MixedLoss.apply(logits, labels, teacher, tau, w, chunk_size)
    return mixed, ce, kd, (labels != IGNORE).sum()


class DistillationLoss:
    """KD from a frozen teacher mixed into next-token loss, on the schedule of `cfg`; outside
    the KD phase (and in evaluation) it is the run's configured loss, `base`.

    Online (`teacher` a model) the teacher runs on each batch; offline (`cfg.soft_labels`,
    `teacher` None) its stored top-K log-probabilities come with the batch, from the loader.
    """

    def __init__(self, teacher: Any, cfg: TeacherConfig, base: Loss,
                 vocab_size: int | None = None) -> None:
        self.teacher, self.cfg, self.base, self.vocab_size = teacher, cfg, base, vocab_size

    def count_targets(self, batch: dict[str, torch.Tensor]) -> list[int]:
        return self.base.count_targets(batch)  # KD counts where next-token loss does

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], step: int,
                 norm: Sequence[float] | None = None) -> LossOutput:
        w = kd_weight(self.cfg, step)
        if w == 0.0 or not torch.is_grad_enabled():  # after the KD phase, and in evaluation
            if w == 0.0 and step >= self.cfg.kd_steps and self.teacher is not None:
                self.release()
            out = self.base(model, batch, step, norm)
            out.metrics |= {"kd_weight": w}
            return out
        # A loss that takes the teacher (the fused next-token and multi-token losses) runs
        # the model itself and applies KD to its next-token head; otherwise the student's
        # logits come from here.
        fused = getattr(self.base, "takes_kd", False)
        logits = None if fused else model(  # ZeRO sees an ordinary forward
            input_ids=batch["input_ids"], **model_inputs(batch, kernel_of(model))).logits
        vocab = logits.shape[-1] if logits is not None else self.vocab_size
        tau = self.cfg.temperature
        if self.cfg.soft_labels:
            if "teacher_ids" not in batch:
                raise RuntimeError(f"step {step} is in the KD phase but its batch has no soft "
                                   "labels: the loader was built without them")
            if vocab is None:
                raise ValueError("DistillationLoss needs vocab_size with a loss that runs "
                                 "the model itself (loss=mtp)")
            probs = offline_probs(batch["teacher_ids"], batch["teacher_logp"], vocab, tau)
        else:
            assert self.teacher is not None, "the teacher was released before the KD phase ended"
            with torch.no_grad():
                h_t = self.teacher.model(input_ids=batch["input_ids"], **model_inputs(
                    batch, kernel_of(self.teacher))).last_hidden_state
            probs = online_probs(h_t, self.teacher.lm_head, tau)
        if logits is None:
            from ipt.mtp.loss import KDTerm

            takes_kd: Any = self.base  # a loss with `takes_kd` has the `kd` keyword
            out = takes_kd(model, batch, step, norm, kd=KDTerm(probs, tau, w))
            out.metrics["kd_weight"] = w
            return out
        mixed, ce, kd, n = kd_losses(logits, batch["labels"], probs, tau, w,
                                     self.cfg.chunk_size)
        d = denominator(norm, n)
        return LossOutput(mixed / d, {"ce": ce / d, "kd": kd / d, "kd_weight": w}, n)

    def release(self) -> None:
        """Drop the teacher: the rest of the run pays nothing for it."""
        log.info("KD phase over: teacher released")
        self.teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
