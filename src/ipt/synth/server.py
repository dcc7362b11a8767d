"""A stand-in for an OpenAI-compatible completions server, over a local `transformers` model:
for testing the client against faults a real server will not make on cue.

The real server is vLLM (`make vllm`; `ipt.synth.vllm` starts it; tests/test_vllm.py tests the
stage against it). This one serves the tests that need a server to misbehave on purpose, and
the throughput benchmark's comparison. Requests that arrive together are generated as one
batch (up to `max_batch`), as vLLM does with continuous batching, only coarser.

    python -m ipt.synth.server --model runs/synth/export --port 8000
    # then synth=openai synth.url=http://127.0.0.1:8000/v1 synth.model=local

`fault` makes it misbehave on purpose, for testing clients: slow (sleeps `slow_s` first),
http500 (every request), flaky (every second request answers 500), garbage (a 200 answer
that is not JSON). It can be changed while serving (`server.fault = "none"`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ipt.synth.hf import Generator

FAULTS = ("none", "slow", "http500", "garbage", "flaky")


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True
    fault = "none"
    slow_s = 5.0
    served = 0  # prompts generated, for tests and benchmarks to check what was paid for
    requests_seen = 0
    lock = threading.Lock()


class Batcher(threading.Thread):
    """Collects concurrent prompts into batches for one generating thread."""

    def __init__(self, gen: Generator, max_batch: int, wait_s: float = 0.01) -> None:
        super().__init__(daemon=True, name="batcher")
        self.gen, self.max_batch, self.wait_s = gen, max_batch, wait_s
        self.inbox: queue.Queue[tuple[str, tuple[int, float], Future]] = queue.Queue()

    def submit(self, prompt: str, max_tokens: int, temperature: float = 0.0) -> Future:
        f: Future = Future()
        self.inbox.put((prompt, (max_tokens, temperature), f))
        return f

    def run(self) -> None:
        while True:
            batch = [self.inbox.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.inbox.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            for params in {m for _, m, _ in batch}:  # one generate call per set of limits
                same = [(p, f) for p, m, f in batch if m == params]
                try:
                    done = self.gen.complete([p for p, _ in same], params[0], len(same),
                                             params[1])
                except Exception as e:  # noqa: BLE001 - reported to the waiting requests
                    for _, f in same:
                        f.set_exception(e)
                    continue
                for (_, f), result in zip(same, done, strict=True):
                    f.set_result(result)


def make_server(model_dir: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16,
                fault: str = "none", slow_s: float = 5.0, device: str = "auto",
                served_name: str = "local") -> CompletionServer:
    if fault not in FAULTS:
        raise ValueError(f"fault={fault!r}; expected one of {FAULTS}")
    batcher = Batcher(Generator(model_dir, device), max_batch)
    batcher.start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass  # quiet: a benchmark sends thousands of requests

        def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)  # fails when the client gave up (timed out, killed)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, json.dumps({"object": "list", "data": [
                    {"id": served_name, "object": "model"}]}).encode())
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.rstrip("/") != "/v1/completions":
                return self._send(404, b'{"error": "not found"}')
            srv = self.server
            assert isinstance(srv, CompletionServer)
            with srv.lock:
                srv.requests_seen += 1
                flaky = srv.requests_seen % 2 == 0
            if srv.fault == "http500" or (srv.fault == "flaky" and flaky):
                return self._send(500, b'{"error": "injected failure"}')
            if srv.fault == "garbage":
                return self._send(200, b"<html>not a completion", "text/html")
            if srv.fault == "slow":
                time.sleep(srv.slow_s)
            try:
                req = json.loads(raw)
                prompts = req["prompt"] if isinstance(req["prompt"], list) else [req["prompt"]]
                max_tokens = int(req.get("max_tokens", 16))
                temperature = float(req.get("temperature", 0.0) or 0.0)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                return self._send(400, json.dumps({"error": f"bad request: {e}"}).encode())
            futures = [batcher.submit(p, max_tokens, temperature) for p in prompts]
            try:
                results = [f.result() for f in futures]
            except Exception as e:  # noqa: BLE001
                return self._send(500, json.dumps({"error": str(e)}).encode())
            with srv.lock:
                srv.served += len(prompts)
            choices = [{"index": i, "text": text, "finish_reason": finish}
                       for i, (text, finish, _) in enumerate(results)]
            usage = {"completion_tokens": sum(n for _, _, n in results)}
            self._send(200, json.dumps({"object": "text_completion", "model": served_name,
                                        "choices": choices, "usage": usage}).encode())

    server = CompletionServer((host, port), Handler)
    server.fault, server.slow_s = fault, slow_s
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--served-name", default="local")
    p.add_argument("--fault", default="none", choices=FAULTS)
    a = p.parse_args()
    server = make_server(a.model, a.host, a.port, a.max_batch, a.fault, served_name=a.served_name)
    print(f"serving {a.model} as {a.served_name!r} on http://{a.host}:{server.server_port}/v1",
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
