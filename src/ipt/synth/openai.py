"""A client of an OpenAI-compatible completions endpoint: vLLM's server (or SGLang's).

At start the client asks the server which models it serves (`/models`), so a server that is
not up, or a model name it does not serve, fails the stage before any work, naming both.

Requests run concurrently (`concurrency` in flight, on one event loop); each has a timeout and
is retried with exponential backoff and jitter on connection errors, timeouts, 429 and 5xx
answers. A 4xx answer (a prompt the server rejects) or a body that is not a completion fails
at once: a retry would not change it. Failures come back as `Result.error`; nothing raises.

Prompts carry their own `<s>` (the released format), so the server is asked not to add one
(`add_special_tokens: false`, in `synth.extra_body`). When the server exports Prometheus
metrics (vLLM's `/metrics`), `metrics()` reads its counters, for the stage's summary of what
the prefix cache saved.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from concurrent.futures import Future
from typing import Any

import aiohttp

from ipt.config import ConfigError, SynthBackendConfig
from ipt.synth.backend import Request, Result, TokenCounter

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}

# The server's counters the stage reports (vLLM's names, without their `_total` suffix).
COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
            "vllm:generation_tokens", "vllm:request_success")


class OpenAIBackend(TokenCounter):
    """The requests run on one event loop, in a thread of its own: hundreds in flight cost
    the client little (a thread a request cost it a third of a core at 256, which a server on
    the same machine then lacked; docs/benchmarks.md)."""

    def __init__(self, cfg: SynthBackendConfig) -> None:
        if not cfg.url:
            raise ConfigError("synth.kind=openai needs synth.url, e.g. http://host:8000/v1")
        if not cfg.model:
            raise ConfigError("synth.kind=openai needs synth.model: the served model's name")
        super().__init__(cfg.tokenizer, cfg.chars_per_token)
        self.cfg = cfg
        self.name = f"openai:{cfg.name or cfg.model}"
        self.concurrency = cfg.concurrency
        self.base = cfg.url.rstrip("/")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="openai-client")
        self.thread.start()
        self.session: aiohttp.ClientSession = self._run(self._open())
        try:
            self.check_served()
        except ConfigError:
            self.close()
            raise

    async def _open(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.cfg.concurrency),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def check_served(self) -> None:
        async def models() -> Any:
            async with self.session.get(f"{self.base}/models",
                                        timeout=aiohttp.ClientTimeout(total=30)) as r:
                return await r.json(content_type=None)

        try:
            answer = self._run(models())
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ConfigError(f"synth.url={self.cfg.url} does not answer "
                              f"({type(e).__name__}: {e}); start the server first") from e
        except json.JSONDecodeError:
            return  # a server without a model list: the first completion will tell
        try:
            served = [m["id"] for m in answer["data"]]
        except (KeyError, TypeError):
            return
        if self.cfg.model not in served:
            raise ConfigError(f"synth.model={self.cfg.model!r} is not served at "
                              f"{self.cfg.url}; it serves {served}")

    def generate(self, requests: list[Request]) -> list[Result]:
        return [f.result() for f in [self.submit(r) for r in requests]]

    def submit(self, request: Request) -> Future[Result]:
        return asyncio.run_coroutine_threadsafe(self._one(request.prompt), self.loop)

    async def _one(self, prompt: str) -> Result:
        body = {"model": self.cfg.model, "prompt": prompt, "max_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature, **self.cfg.extra_body}
        error, unreachable = "no attempt made", False
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(
                    self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            unreachable = False
            try:
                async with self.session.post(f"{self.base}/completions", json=body) as r:
                    status, text = r.status, await r.text()
            except TimeoutError:
                error, unreachable = f"timed out after {self.cfg.timeout_s}s", True
                continue
            except aiohttp.ClientError as e:
                error, unreachable = f"{type(e).__name__}: {e}", True
                continue
            if status in RETRYABLE:
                error = f"HTTP {status}: {text[:200]}"
                continue
            if status != 200:
                return Result(None, f"HTTP {status}: {text[:200]}")
            try:
                answer = json.loads(text)
                choice = answer["choices"][0]
                usage = answer.get("usage") or {}
                return Result(str(choice["text"]), finish=choice.get("finish_reason") or "stop",
                              tokens=usage.get("completion_tokens"))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
                return Result(None, f"malformed response: {text[:200]!r}")
        return Result(None, f"{error} ({self.cfg.retries + 1} attempts)", unreachable=unreachable)

    def metrics(self) -> dict[str, float] | None:
        """The server's counters (`COUNTERS`) from its Prometheus `/metrics`, summed over
        their labels; None when it has none."""
        async def scrape() -> tuple[int, str]:
            async with self.session.get(self.base.removesuffix("/v1") + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                return r.status, await r.text()

        try:
            status, text = self._run(scrape())
        except (aiohttp.ClientError, TimeoutError):
            return None
        return read_counters(text) if status == 200 else None

    def close(self) -> None:
        if not self.loop.is_running():
            return
        self._run(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


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
