"""A local `transformers` synthesizer: batched greedy generation.

Prompts are sorted by length and cut into batches of `batch_size`, so each batch pads
little; padding is on the left, so every row's next token comes from the same position and
one `generate` call serves the whole batch. Results come back in the caller's order.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ipt.config import ConfigError, SynthBackendConfig
from ipt.synth.backend import Request, Result, TokenCounter

log = logging.getLogger(__name__)


class Generator:
    """A causal LM and its tokenizer; `complete` is what both the backend and the local
    OpenAI-compatible server (`ipt.synth.server`) call."""

    def __init__(self, model_dir: str, device: str = "auto", dtype: str = "auto") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        torch_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                       "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        try:
            self.tok = AutoTokenizer.from_pretrained(model_dir)
            model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        except (OSError, ValueError) as e:  # no config.json, no tokenizer files, bad weights
            raise ConfigError(f"synth.model={model_dir!r} is not a loadable model folder "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
        self.model = model.to(self.device).eval()
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos

    @torch.inference_mode()
    def complete(self, prompts: list[str], max_new_tokens: int, batch_size: int,
                 temperature: float = 0.0) -> list[tuple[str, str, int]]:
        """(generation, finish reason, tokens generated) for each prompt, stopping at EOS
        (counted, as a server counts it); greedy at temperature 0, else sampled."""
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else \
            {"do_sample": False}
        ids = self.tok(prompts, add_special_tokens=False)["input_ids"]  # `<s>` is in the text
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: list[tuple[str, str, int]] = [("", "", 0)] * len(ids)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for n, i in enumerate(rows):
                input_ids[n, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[n, width - len(ids[i]):] = 1
            new = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens, eos_token_id=self.eos, **sampling,
                pad_token_id=self.pad, use_cache=True)[:, width:].tolist()
            for n, i in enumerate(rows):
                tokens = new[n]
                stop = self.eos in tokens
                tokens = tokens[:tokens.index(self.eos)] if stop else tokens
                out[i] = (str(self.tok.decode(tokens, skip_special_tokens=True)),
                          "stop" if stop else "length", len(tokens) + stop)
        return out


class HFBackend(TokenCounter):
    def __init__(self, cfg: SynthBackendConfig) -> None:
        if not cfg.model:
            raise ConfigError("synth.kind=hf needs synth.model: a Hugging Face model folder")
        self.cfg = cfg
        self.gen = Generator(cfg.model, cfg.device, cfg.dtype)
        self.tok, self.chars_per_token = self.gen.tok, cfg.chars_per_token
        self.name = f"hf:{cfg.name or cfg.model}"

    def generate(self, requests: list[Request]) -> list[Result]:
        try:
            done = self.gen.complete([r.prompt for r in requests], self.cfg.max_new_tokens,
                                     self.cfg.batch_size, self.cfg.temperature)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: these documents fail
            log.warning("generation failed for %d documents: %s", len(requests), e)
            return [Result(None, f"{type(e).__name__}: {str(e)[:200]}") for _ in requests]
        return [Result(text, finish=finish, tokens=n) for text, finish, n in done]

    def close(self) -> None:
        pass
