"""What a synthesizer backend is: prompts in, generations (or errors) out, and a token
counter to fit prompts into its context. The backends themselves: `ipt.synth.backends`.

A backend generates a list of requests at once (`generate`: a local model batches them); one
that serves requests concurrently (a server) also takes them one at a time (`submit`), so the
stage can keep it busy, sending each chain's next link the moment the previous one returns.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ipt.config import SynthBackendConfig


class ServerGone(Exception):
    """The synthesizer's server stopped answering; the run can be continued."""


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
    tokens: int | None = None  # tokens generated (a server's count includes the final EOS)
    unreachable: bool = False  # failed to reach the server (connection, timeout), not by its answer


class Backend(Protocol):
    name: str  # the synthesizer id written into every record
    cfg: SynthBackendConfig

    def count_tokens(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...

    def generate(self, requests: list[Request]) -> list[Result]: ...

    def close(self) -> None: ...


@runtime_checkable
class Concurrent(Backend, Protocol):
    """A backend serving `concurrency` requests at once, each as it is submitted."""

    concurrency: int

    def submit(self, request: Request) -> Future[Result]: ...


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
