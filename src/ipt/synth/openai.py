"""A client of an OpenAI-compatible completions endpoint (vLLM's server, or `ipt.synth.server`).

Requests run concurrently (`concurrency` in flight); each has a timeout and is retried with
exponential backoff and jitter on connection errors, timeouts, 429 and 5xx answers. A 4xx
answer (a prompt the server rejects) or a body that is not a completion fails at once: a
retry would not change it. Failures come back as `Result.error`; nothing raises.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from ipt.config import ConfigError, SynthBackendConfig
from ipt.synth.backend import Request, Result, TokenCounter

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class OpenAIBackend(TokenCounter):
    def __init__(self, cfg: SynthBackendConfig) -> None:
        if not cfg.url:
            raise ConfigError("synth.kind=openai needs synth.url, e.g. http://host:8000/v1")
        if not cfg.model:
            raise ConfigError("synth.kind=openai needs synth.model: the served model's name")
        super().__init__(cfg.tokenizer, cfg.chars_per_token)
        self.cfg = cfg
        self.name = f"openai:{cfg.name or cfg.model}"
        self.client = httpx.Client(
            base_url=cfg.url.rstrip("/"), timeout=cfg.timeout_s,
            limits=httpx.Limits(max_connections=cfg.concurrency,
                                max_keepalive_connections=cfg.concurrency))
        self.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="openai")

    def generate(self, requests: list[Request]) -> list[Result]:
        return list(self.pool.map(self._one, [r.prompt for r in requests]))

    def _one(self, prompt: str) -> Result:
        body = {"model": self.cfg.model, "prompt": prompt, "max_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature}
        error = "no attempt made"
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            try:
                r = self.client.post("/completions", json=body)
            except httpx.TimeoutException:
                error = f"timed out after {self.cfg.timeout_s}s"
                continue
            except httpx.TransportError as e:
                error = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in RETRYABLE:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code != 200:
                return Result(None, f"HTTP {r.status_code}: {r.text[:200]}")
            try:
                choice = r.json()["choices"][0]
                return Result(str(choice["text"]), finish=choice.get("finish_reason") or "stop")
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                return Result(None, f"malformed response: {r.text[:200]!r}")
        return Result(None, f"{error} ({self.cfg.retries + 1} attempts)")

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()
