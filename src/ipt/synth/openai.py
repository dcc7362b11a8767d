"""A client of an OpenAI-compatible completions endpoint: vLLM's server (or SGLang's).

At start the client asks the server which models it serves (`/models`), so a server that is
not up, or a model name it does not serve, fails the stage before any work, naming both.

Requests run concurrently (`concurrency` in flight); each has a timeout and is retried with
exponential backoff and jitter on connection errors, timeouts, 429 and 5xx answers. A 4xx
answer (a prompt the server rejects) or a body that is not a completion fails at once: a
retry would not change it. Failures come back as `Result.error`; nothing raises.

Prompts carry their own `<s>` (the released format), so the server is asked not to add one
(`add_special_tokens: false`, in `synth.extra_body`). When the server exports Prometheus
metrics (vLLM's `/metrics`), `metrics()` reads its counters, for the stage's summary of what
the prefix cache saved.
"""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from ipt.config import ConfigError, SynthBackendConfig
from ipt.synth.backend import Request, Result, TokenCounter

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}

# The server's counters the stage reports (vLLM's names, without their `_total` suffix).
COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
            "vllm:generation_tokens", "vllm:request_success")


class OpenAIBackend(TokenCounter):
    def __init__(self, cfg: SynthBackendConfig) -> None:
        if not cfg.url:
            raise ConfigError("synth.kind=openai needs synth.url, e.g. http://host:8000/v1")
        if not cfg.model:
            raise ConfigError("synth.kind=openai needs synth.model: the served model's name")
        super().__init__(cfg.tokenizer, cfg.chars_per_token)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line a request, thousands a minute
        self.cfg = cfg
        self.name = f"openai:{cfg.name or cfg.model}"
        self.concurrency = cfg.concurrency
        self.client = httpx.Client(
            base_url=cfg.url.rstrip("/"), timeout=cfg.timeout_s,
            limits=httpx.Limits(max_connections=cfg.concurrency,
                                max_keepalive_connections=cfg.concurrency))
        self.check_served()
        self.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="openai")

    def check_served(self) -> None:
        try:
            r = self.client.get("/models", timeout=min(30.0, self.cfg.timeout_s))
        except httpx.TransportError as e:
            self.client.close()
            raise ConfigError(f"synth.url={self.cfg.url} does not answer "
                              f"({type(e).__name__}: {e}); start the server first") from e
        try:
            served = [m["id"] for m in r.json()["data"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            return  # a server without a model list: the first completion will tell
        if self.cfg.model not in served:
            self.client.close()
            raise ConfigError(f"synth.model={self.cfg.model!r} is not served at "
                              f"{self.cfg.url}; it serves {served}")

    def generate(self, requests: list[Request]) -> list[Result]:
        return list(self.pool.map(self._one, [r.prompt for r in requests]))

    def submit(self, request: Request) -> Future[Result]:
        return self.pool.submit(self._one, request.prompt)

    def _one(self, prompt: str) -> Result:
        body = {"model": self.cfg.model, "prompt": prompt, "max_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature, **self.cfg.extra_body}
        error, unreachable = "no attempt made", False
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            unreachable = False
            try:
                r = self.client.post("/completions", json=body)
            except httpx.TimeoutException:
                error, unreachable = f"timed out after {self.cfg.timeout_s}s", True
                continue
            except httpx.TransportError as e:
                error, unreachable = f"{type(e).__name__}: {e}", True
                continue
            if r.status_code in RETRYABLE:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code != 200:
                return Result(None, f"HTTP {r.status_code}: {r.text[:200]}")
            try:
                answer = r.json()
                choice = answer["choices"][0]
                usage = answer.get("usage") or {}
                return Result(str(choice["text"]), finish=choice.get("finish_reason") or "stop",
                              tokens=usage.get("completion_tokens"))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
                return Result(None, f"malformed response: {r.text[:200]!r}")
        return Result(None, f"{error} ({self.cfg.retries + 1} attempts)", unreachable=unreachable)

    def metrics(self) -> dict[str, float] | None:
        """The server's counters (`COUNTERS`) from its Prometheus `/metrics`, summed over
        their labels; None when it has none."""
        base = self.cfg.url.rstrip("/").removesuffix("/v1")  # type: ignore[union-attr]
        try:
            r = self.client.get(f"{base}/metrics", timeout=10.0)
        except httpx.TransportError:
            return None
        if r.status_code != 200:
            return None
        return read_counters(r.text)

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()


def read_counters(text: str) -> dict[str, float] | None:
    """`COUNTERS` from Prometheus' text format (`name{labels} value`), summed over labels."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split(" ")[0].removesuffix("_total")
        if name in COUNTERS:
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found or None
