"""The fused unembedding and cross-entropy of one head (`loss=ntp`) or n (`loss=mtp`):

    L = sum_i w_i * CE_i          (loss.reduction=sum)   or   the same / n   (mean)

CE_i is head i's mean cross-entropy over its own targets (token t + i), each head normalised
by its own count: over the whole step, all micro-batches and ranks (the trainer's `norm`,
see `ipt.losses`). DeepSeek-V3's L_main + (lambda / D) * sum_k CE_k is `reduction=sum` with
weights [1, lambda / D, ...] (`configs/loss/mtp_sequential.yaml`). A position has no target
for head i when token t + i lies in another document of the packed sequence, past the
sequence, or under a loss mask.

Memory. The naive loss keeps every head's logits ([batch, seq, vocab] each, plus their fp32
softmax) until the backward: n times the largest tensor of a step. Gloeckle et al. avoid that
by running each head's forward and backward in turn into a detached trunk output. Under
DeepSpeed a micro-batch must be one forward and one backward (ZeRO's gradient hooks fire once
per parameter, ZeRO-3 gathers parameters around module calls), so this module gets the same
effect inside one graph: the shared unembedding and the loss are one autograd function that
runs over chunks of positions and computes, in its forward, the loss and its gradients with
respect to the heads' hidden states and the unembedding weight. Logits exist one chunk at a
time for every head; what is kept for the backward is the hidden states' gradient and the
unembedding's (an fp32 [vocab, hidden] buffer). Nothing is recomputed.
See docs/design-notes.md. (The heads themselves are `ipt.mtp`'s.)

With a teacher (SALT), head 1's term is (1 - w) * CE + w * KD, computed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ipt.attention import model_inputs
from ipt.config import LossConfig
from ipt.losses.base import IGNORE, LossOutput
from ipt.losses.kd import KDTerm, chunk_grad, kd_losses
from ipt.losses.logits import IDENTITY, LogitRule


def head_targets(input_ids: torch.Tensor, labels: torch.Tensor, n: int,
                 eos_id: int | None) -> torch.Tensor:
    """[n, batch, seq]: row i - 1 holds the target of head i at each position (IGNORE where
    it has none). `labels` are the next-token targets the loader made (IGNORE at document
    ends, under loss masks, in padding); token t + i is `labels[t + i - 1]`, and it counts
    only if no document ends at positions t .. t + i - 2. A document ends at its EOS (every
    prepared document has one); without an EOS id every IGNORE counts as an end, which may
    drop a few targets next to loss masks but never crosses a document."""
    out = labels.new_full((n, *labels.shape), IGNORE)
    out[0] = labels
    seq = labels.shape[-1]
    ends = labels == IGNORE
    if eos_id is not None:
        ends &= input_ids == eos_id
    same_doc = torch.ones_like(ends)
    for k in range(1, min(n, seq)):
        same_doc[:, :seq - k] &= ~ends[:, k - 1:seq - 1]
        same_doc[:, seq - k:] = False
        out[k, :, :seq - k] = labels[:, k:]
        out[k][~same_doc] = IGNORE
    return out


class _UnembedLoss(torch.autograd.Function):
    """sum_i scales[i] * (CE sum of head i), heads' hidden states [n, positions, hidden],
    the unembedding [vocab, hidden] and its bias (or None) in, the logits made by the family's
    `rule`; the gradients for all three are computed in the forward, chunk by chunk, and kept
    for the backward (the logits never exist whole)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, scales: list[float], kd: KDTerm | None, rule: LogitRule,
                chunk_size: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
        # `need_grad` comes from the caller: inside forward, grad mode is always off, and
        # ctx.needs_input_grad says True even under torch.no_grad().
        h_all, w_mat = hidden.detach(), weight.detach()
        grad_h = torch.zeros_like(h_all) if need_grad else None
        grad_w = torch.zeros(w_mat.shape, dtype=torch.float32, device=w_mat.device) \
            if need_grad else None
        grad_b = torch.zeros(w_mat.shape[0], dtype=torch.float32, device=w_mat.device) \
            if need_grad and bias is not None else None
        n, positions = targets.shape[0], targets.shape[1]
        ce = torch.zeros(n, dtype=torch.float64, device=h_all.device)
        kd_sum = torch.zeros((), dtype=torch.float64, device=h_all.device)
        # Every GEMM here runs in one dtype, chosen once: autocast's when it is on (it would
        # cast the out-of-place products but skip an in-place `addmm_`, leaving that one a
        # full fp32 GEMM), else the weight's. The unembedding is cast once, not per chunk.
        compute = matmul_dtype(w_mat)
        w_c = w_mat.to(compute)
        b_c = None if bias is None else bias.detach().to(compute)
        with torch.autocast(w_mat.device.type, enabled=False):
            for i in range(n):
                teacher = kd if i == 0 else None
                # Every chunk runs, even one without targets: skipping it would need a sync
                # with the host, and a teacher's chunk may be a collective (ZeRO-3).
                for a in range(0, positions, chunk_size):
                    sl = slice(a, a + chunk_size)
                    h = h_all[i, sl].to(compute)
                    p_t = teacher.probs(sl, slice(None)) if teacher else None
                    z = h @ w_c.T if b_c is None else torch.addmm(b_c, h, w_c.T)
                    s = rule(z.float())
                    c_ce, c_kd, g = chunk_grad(s, targets[i, sl], p_t,
                                               teacher.tau if teacher else 1.0,
                                               teacher.w if teacher else 0.0)
                    ce[i] += c_ce
                    kd_sum += c_kd
                    if grad_h is not None and grad_w is not None:
                        g = rule.backward(s, g).mul_(scales[i])
                        if grad_b is not None:
                            grad_b.add_(g.sum(0))
                        g = g.to(compute)
                        grad_h[i, sl] = g @ w_c
                        if compute == torch.float32:
                            grad_w.addmm_(g.T, h)
                        else:  # a bf16 GEMM, accumulated in fp32 over chunks and heads
                            grad_w.add_(g.T @ h)
        w0 = kd.w if kd else 0.0
        total = scales[0] * ((1 - w0) * ce[0] + w0 * kd_sum)
        total = total + sum(scales[i] * ce[i] for i in range(1, n))
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = w_mat.dtype
        ce_f, kd_f = ce.float(), kd_sum.float()
        ctx.mark_non_differentiable(ce_f, kd_f)
        return total.float(), ce_f, kd_f

    @staticmethod
    def backward(ctx: Any, g_total: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # In place: the buffers are this backward's alone (the graph is not retained).
        grad_b = None if grad_b is None else grad_b.mul_(g_total).to(ctx.weight_dtype)
        return (grad_h.mul_(g_total), grad_w.mul_(g_total).to(ctx.weight_dtype), grad_b,
                None, None, None, None, None, None)


def matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the fused loss's GEMMs run in: autocast's on the weight's device when
    autocast is on there (the trainer's bf16 path over fp32 weights), else the weight's own."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _naive(hs: list[torch.Tensor], lm_head: torch.nn.Module, rule: LogitRule,
           targets: torch.Tensor, scales: list[float], kd: KDTerm | None,
           chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every head's logits at once, through autograd: the baseline the fused loss replaces."""
    total = torch.zeros((), device=hs[0].device)
    ce = torch.zeros(len(hs), device=hs[0].device)
    kd_sum = torch.zeros((), device=hs[0].device)
    for i, h in enumerate(hs):
        logits = rule(lm_head(h))
        if i == 0 and kd is not None:
            mixed, c, k, _ = kd_losses(logits, targets[0], kd.probs, kd.tau, kd.w, chunk_size)
            kd_sum = k
        else:
            c = mixed = F.cross_entropy(logits.float().flatten(0, 1), targets[i].flatten(),
                                        ignore_index=IGNORE, reduction="sum")
        total = total + scales[i] * mixed
        ce[i] = c.detach()
    return total, ce, kd_sum.detach()


def heads_loss(hs: list[torch.Tensor], lm_head: torch.nn.Module, targets: torch.Tensor,
               scales: list[float], kd: KDTerm | None, memory_efficient: bool,
               chunk_size: int, rule: LogitRule = IDENTITY,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss with its graph, CE sum per head, KD sum) of the heads' hidden states,
    their logits made by the output embedding `lm_head` and the family's `rule`."""
    if not memory_efficient:
        return _naive(hs, lm_head, rule, targets, scales, kd, chunk_size)
    hidden = torch.stack([h.flatten(0, 1) for h in hs])
    return _UnembedLoss.apply(hidden, lm_head.weight, getattr(lm_head, "bias", None),
                              targets.flatten(1), scales, kd, rule, chunk_size,
                              torch.is_grad_enabled())


class FusedLoss:
    """The loss of `cfg.heads` heads through the engine's model (`ipt.model.FusedLM`, or
    one with extra heads attached): next-token loss is its one-head case. In evaluation only
    head 1 runs and the loss is its CE, so `val_loss` means the same with and without extra
    heads."""

    takes_kd = True  # DistillationLoss hands it the teacher for head 1

    def __init__(self, cfg: LossConfig, eos_id: int | None) -> None:
        n = cfg.heads
        self.cfg, self.eos_id = cfg, eos_id
        self.weights = list(cfg.weights) if cfg.weights is not None else [1.0] * n
        self.later = list(cfg.later_weights) if cfg.later_weights is not None else None
        self.divisor = n if cfg.reduction == "mean" else 1

    def weights_at(self, step: int) -> list[float]:
        """The head weights at optimizer step `step` (a pure function: resume is exact)."""
        later = self.later is not None and step >= (self.cfg.later_from_step or 0)
        return self.later if later and self.later is not None else self.weights

    def count_targets(self, batch: dict[str, torch.Tensor]) -> list[int]:
        """Each head's target count (the trainer's `norm` is made of these)."""
        targets = head_targets(batch["input_ids"], batch["labels"], self.cfg.heads, self.eos_id)
        return [int(c) for c in (targets != IGNORE).sum((1, 2)).tolist()]

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], step: int,
                 norm: Sequence[float] | None = None, kd: KDTerm | None = None) -> LossOutput:
        training = torch.is_grad_enabled()
        n = self.cfg.heads if training else 1  # evaluation: head 1 alone, the extra heads idle
        targets = head_targets(batch["input_ids"], batch["labels"], n, self.eos_id)
        found = (targets != IGNORE).sum((1, 2))  # on the device: read by no one in a step
        # Python numbers from the trainer (a tensor made from them on a GPU would be a
        # synchronous copy), or this micro-batch's own counts, on the device (evaluation)
        counts: list[Any] = [float(c) for c in norm[:n]] if norm is not None \
            else list(found.clamp(min=1).double().unbind())
        scales = [w / c / self.divisor for w, c in zip(self.weights_at(step), counts,
                                                       strict=False)]
        loss, ce, kd_sum, router = model(
            input_ids=batch["input_ids"], targets=targets, scales=scales,
            documents=model_inputs(batch, model), kd=kd,
            memory_efficient=self.cfg.memory_efficient, chunk_size=self.cfg.chunk_size,
            heads=training)
        per_head = [ce[i].double() / counts[i] for i in range(n)]
        metrics: dict[str, Any] = {"ce": per_head[0]}
        metrics |= {f"ce_{i + 1}": per_head[i] for i in range(1, n)}
        if kd is not None:
            metrics["kd"] = kd_sum / counts[0]
        if router is not None:  # a mixture of experts' load balancing, apart from `ce`
            metrics["router_aux"] = router.detach()
        if not training:
            loss = per_head[0].float()
        return LossOutput(loss, metrics, found[0])
