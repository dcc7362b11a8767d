"""Distillation terms shared by every loss that learns from a teacher's distribution.

    KD = tau^2 * CE(softmax(teacher / tau) -> softmax(student / tau))

over the positions that have a target, so loss masks and document ends count for neither
term, and over the tokenizer's rows only: a teacher and a student of one tokenizer may pad
their vocabularies differently (Qwen2.5's sizes), and the padding rows are no tokens. CE
keeps every row of the student, as its family's forward does. The loss and its gradient with respect to the student's logits are computed together,
one chunk of positions at a time: the teacher's distribution and the fp32 softmaxes exist
one chunk at a time, and nothing is recomputed. A teacher is a function giving its
distribution for a chunk (`TeacherProbs`): online from its hidden states, or offline from
stored top-K log-probabilities. What schedules KD and loads the teacher is SALT's
(`ipt.slm.kd`); the fused unembedding loss (`ipt.losses.fused`) applies a `KDTerm` to its
first head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ipt.losses.base import IGNORE
from ipt.losses.logits import IDENTITY, LogitRule

TeacherProbs = Callable[[slice, Any], torch.Tensor]
"""The teacher's softmax at temperature tau, fp32 [targets, vocab], for the rows `rows` (a
mask, or a slice) of the flat positions `sl`."""


def online_probs(h_t: torch.Tensor, head_t: torch.nn.Module, tau: float,
                 rule: LogitRule = IDENTITY, vocab: int | None = None) -> TeacherProbs:
    """From the teacher's last hidden states: its output layer and its family's logit `rule`
    run one chunk at a time; the first `vocab` rows (the tokenizer's; None: all) are its
    distribution."""
    flat = h_t.detach().flatten(0, 1)

    def probs(sl: slice, rows: Any) -> torch.Tensor:
        # Every chunk runs the output layer, even one with no target: under ZeRO-3 each
        # call gathers its weight, a collective all ranks must join.
        logits = rule(head_t(flat[sl][rows]).float())[:, :vocab]
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
    w must be 0) over the first p_t.shape[1] rows (the tokenizer's), and the gradient of
    (1 - w) * CE + w * KD with respect to `s` (left as it is), zero in rows without a
    target.

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
    elif tau == 1.0 and p_t.shape[1] == s.shape[1]:  # q = p: the gradient is p - w * p_t
        kd = -(((p_t * log_p).sum(-1)) @ weight).double()
        g = log_p.exp_().sub_(p_t, alpha=w)
    else:  # (1 - w) p + w tau (q - p_t), q over the tokenizer's rows
        rows = p_t.shape[1]
        log_q = F.log_softmax(s[:, :rows] / tau, dim=-1)
        kd = -(((p_t * log_q).sum(-1)) @ weight).double() * tau**2
        g = log_p.exp_().mul_(1 - w)
        g[:, :rows].add_(log_q.exp_().sub_(p_t), alpha=w * tau)
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


@dataclass
class KDTerm:
    """Distillation on head 1: the teacher's distribution per chunk, temperature, weight."""

    probs: TeacherProbs
    tau: float
    w: float
