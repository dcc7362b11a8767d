"""Synthesizer backends behind one interface: prompts in, generations (or errors) out.

- `rules`: the AdaptLLM miner; reads the text, ignores the prompt, never fails.
- `hf`: a local `transformers` causal LM, batched greedy generation (`ipt.synth.hf`).
- `openai`: an OpenAI-compatible completions server such as vLLM (`ipt.synth.openai`).

A backend never raises for one bad document: a failed generation comes back as a `Result`
with its error, and the stage records it and goes on. Token counting (for fitting prompts
into the context) uses the model's tokenizer when there is one, else an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ipt.config import ConfigError, SynthBackendConfig
from ipt.synth import format as fmt
from ipt.synth.rules import Miner, read_words


@dataclass(frozen=True)
class Request:
    doc_id: str
    text: str  # the text to read, already truncated to fit
    prompt: str  # the released format: chained examples, then the text's context


@dataclass(frozen=True)
class Result:
    text: str | None  # the generation; None when it failed
    error: str | None = None
    finish: str = "stop"  # stop | length


class Backend(Protocol):
    name: str  # the synthesizer id written into every record
    cfg: SynthBackendConfig

    def count_tokens(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...

    def generate(self, requests: list[Request]) -> list[Result]: ...

    def close(self) -> None: ...


class TokenCounter:
    """Counts and truncates with a tokenizer folder, or estimates from characters."""

    def __init__(self, tokenizer_dir: str | None, chars_per_token: float) -> None:
        self.tok = None
        if tokenizer_dir:
            from ipt.data import tokenizer as tok

            self.tok = tok.load(tokenizer_dir)
        self.chars_per_token = chars_per_token

    def count_tokens(self, text: str) -> int:
        if self.tok is None:
            return int(len(text) / self.chars_per_token) + 1
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` within `max_tokens`, cut at a token boundary."""
        if self.tok is None:
            return text[:max(0, int(max_tokens * self.chars_per_token))]
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= max_tokens:
            return text
        return text[:enc["offset_mapping"][max_tokens][0]] if max_tokens > 0 else ""


class RulesBackend(TokenCounter):
    """The rule-based miner, answering in the released format so parsing is shared."""

    def __init__(self, cfg: SynthBackendConfig) -> None:
        super().__init__(cfg.tokenizer, cfg.chars_per_token)
        self.cfg = cfg
        self.name = "rules"
        self.miner = Miner(cfg.min_sentence_chars, cfg.per_kind, read_words(cfg.domain_words))

    def generate(self, requests: list[Request]) -> list[Result]:
        return [Result(fmt.render_pairs(self.miner.mine(r.text, r.doc_id)) + fmt.EOS)
                for r in requests]

    def close(self) -> None:
        pass


BACKENDS = ("rules", "hf", "openai")


def build(cfg: SynthBackendConfig) -> Backend:
    if cfg.kind == "rules":
        return RulesBackend(cfg)
    if cfg.kind == "hf":
        from ipt.synth.hf import HFBackend

        return HFBackend(cfg)
    if cfg.kind == "openai":
        from ipt.synth.openai import OpenAIBackend

        return OpenAIBackend(cfg)
    raise ConfigError(f"synth.kind={cfg.kind!r}; expected one of {BACKENDS}")
