"""Greedy decoding, plain and self-speculative with a model's own (parallel) MTP heads.

Self-speculation (one sequence at a time): after each forward, head 1 gives the next token
for certain and heads 2..n draft the n - 1 after it. The next forward runs the model on all
n at once, with KV caches; head 1's prediction after each prefix verifies the drafts, left to
right, and the first mismatch ends the accepted run. Its output is the plain greedy output;
each forward yields 1 to n tokens instead of 1. Rejected positions are cropped from the
caches (the model's and the heads', which always have the same length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from ipt.model import cache_kwargs
from ipt.mtp.heads import HeadsError, MTPModel, load_heads


@dataclass
class Decoded:
    tokens: list[int]  # the new tokens (the prompt excluded)
    seconds: float
    forwards: int  # model forwards, the prompt's included
    # tokens each verifying forward committed (the first certain, the rest verified drafts);
    # the text's last token may need no verifying forward
    accepted: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens per verifying forward: 1 means no draft was ever accepted."""
        return sum(self.accepted) / len(self.accepted) if self.accepted else 1.0


def load(path: str | Path) -> MTPModel:
    """An exported model with its MTP heads, for decoding (fp32, eval mode)."""
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = MTPModel(lm, load_heads(path, lm)).eval()
    if model.head_type != "parallel":
        raise HeadsError(f"{path} has {model.head_type} MTP heads: self-speculative decoding "
                         "is built for parallel heads only; decode it with plain greedy "
                         "decoding (decode=greedy)")
    return model


def _stop(tokens: list[int], max_new: int, eos_id: int | None) -> list[int] | None:
    """`tokens` cut after the first EOS or at `max_new`, or None to go on."""
    if eos_id is not None and eos_id in tokens:
        return tokens[:tokens.index(eos_id) + 1][:max_new]
    return tokens[:max_new] if len(tokens) >= max_new else None


@torch.no_grad()
def greedy(lm: PreTrainedModel, prompt: torch.Tensor, max_new: int,
           eos_id: int | None) -> Decoded:
    """Plain greedy decoding with a KV cache, one token per forward (the baseline)."""
    start = time.perf_counter()
    past = DynamicCache(config=lm.config)
    cache = cache_kwargs(lm, past)
    logits = lm(input_ids=prompt, use_cache=True, logits_to_keep=1, **cache).logits
    tokens: list[int] = []
    forwards = 1
    while True:
        tokens.append(int(logits[0, -1].argmax()))
        done = _stop(tokens, max_new, eos_id)
        if done is not None:
            return Decoded(done, time.perf_counter() - start, forwards)
        logits = lm(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **cache).logits
        forwards += 1


@torch.no_grad()
def self_speculative(model: MTPModel, prompt: torch.Tensor, max_new: int,
                     eos_id: int | None) -> Decoded:
    """Greedy decoding drafted by heads 2..n and verified by head 1: the same tokens as
    `greedy`, in fewer forwards."""
    if prompt.shape[0] != 1:
        raise ValueError("self-speculative decoding takes one sequence at a time")
    start = time.perf_counter()
    past, head_past = DynamicCache(config=model.config), DynamicCache()

    def predict(hs: list[torch.Tensor], at: int) -> list[int]:
        return [int(model.logits(h[0, at]).argmax()) for h in hs]

    hs = model.hidden(prompt, past=past, head_past=head_past)
    candidate = predict([h[:, -1:] for h in hs], 0)  # the next token, then the drafts
    tokens: list[int] = []
    accepted: list[int] = []
    forwards = 1
    while True:
        # candidate[0] is certain: if it ends the text, no forward is needed to verify
        done = _stop(tokens + candidate[:1], max_new, eos_id)
        if done is not None:
            return Decoded(done, time.perf_counter() - start, forwards, accepted)
        candidate = candidate[:max_new - len(tokens)]
        hs = model.hidden(torch.tensor([candidate]), past=past, head_past=head_past)
        forwards += 1
        verified = model.logits(hs[0][0]).argmax(-1).tolist()  # head 1 after each prefix
        a = 1
        while a < len(candidate) and candidate[a] == verified[a - 1]:
            a += 1
        done = _stop(tokens + candidate[:a], max_new, eos_id)
        if done is not None:
            accepted.append(len(done) - len(tokens))  # what the text kept of this step
            return Decoded(done, time.perf_counter() - start, forwards, accepted)
        tokens += candidate[:a]
        accepted.append(a)
        if a < len(candidate):
            past.crop(a - len(candidate))
            head_past.crop(a - len(candidate))
        candidate = [verified[a - 1]] + predict(hs[1:], a - 1)
