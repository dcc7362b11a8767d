"""How a causal LM makes its logits of its last hidden state h, as its family computes them:

    logits = softcap(scale * (h @ W.T + b)),    softcap(x) = c * tanh(x / c)

W is the output embedding (tied to the input embedding or not) and b its bias (Phi-2's);
`scale` is a logit scale (Cohere's `logit_scale`, Granite's 1 / `logits_scaling`) and c a
final soft-cap (Gemma 2's and 3's `final_logit_softcapping`). The fused loss, the extra heads
and online distillation make logits a chunk at a time with this rule, and
`ipt.model.check_unembedding` proves at start-up, on one forward, that it gives the family's
own logits. A vocabulary padded past the tokenizer (Qwen2.5, Pythia) is kept whole: its
padding rows are ordinary logits, as in the family's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LogitRule:
    """What a family does to h @ W.T + b: a scale, then a soft-cap."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        s = z * self.scale if self.scale != 1.0 else z
        return s if self.softcap is None else torch.tanh(s / self.softcap) * self.softcap

    def backward(self, logits: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to h @ W.T + b from the one with respect to the
        `logits` the rule made (in place on `grad`)."""
        if self.softcap is not None:  # d tanh = 1 - tanh^2
            grad.mul_(1 - (logits / self.softcap).square())
        return grad.mul_(self.scale) if self.scale != 1.0 else grad


IDENTITY = LogitRule()  # most families: logits = h @ W.T (+ b)


def logit_rule(config: Any) -> LogitRule:
    """The rule of a transformers config's family (the identity for most)."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere: logits * scale
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / scaling
    if divisor:
        scale /= float(divisor)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitRule(scale, float(softcap) if softcap else None)


def logits(h: torch.Tensor, head: torch.nn.Module, rule: LogitRule) -> torch.Tensor:
    """The family's logits of hidden states `h` through its output embedding `head` (which
    adds its bias, if it has one)."""
    return rule(head(h))
