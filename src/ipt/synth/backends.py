"""Synthesizer backends behind one interface: prompts in, generations (or errors) out.

- `rules`: the AdaptLLM miner; reads the text, ignores the prompt, never fails.
- `hf`: a local `transformers` causal LM, batched greedy generation (`ipt.synth.hf`).
- `openai`: an OpenAI-compatible completions server such as vLLM (`ipt.synth.openai`).

A backend never raises for one bad document: a failed generation comes back as a `Result`
with its error, and the stage records it and goes on. Token counting (for fitting prompts
into the context) uses the model's tokenizer when there is one, else an estimate.
"""

from __future__ import annotations

from ipt.config import ConfigError, SynthBackendConfig
from ipt.data import pairs as fmt
from ipt.synth.backend import Backend, Request, Result, TokenCounter
from ipt.synth.hf import HFBackend
from ipt.synth.openai import OpenAIBackend
from ipt.synth.rules import Miner, read_words


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
        return HFBackend(cfg)
    if cfg.kind == "openai":
        return OpenAIBackend(cfg)
    raise ConfigError(f"synth.kind={cfg.kind!r}; expected one of {BACKENDS}")
