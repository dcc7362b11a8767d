"""A real vLLM server's life: start it from its own virtualenv, wait until it serves, stop it.

vLLM lives in a virtualenv of its own (`make vllm` builds `.venv-vllm` from
`constraints-vllm-cpu.txt` or `-cuda.txt`): its pins (transformers < 5.20, its own torch build)
are not the trainer's. The tests, the throughput benchmark and `launch/synthesize.sbatch` start
it through here:

    with Server("runs/demo-synth/hf") as server:   # waits until /health answers
        synthesize(... synth.url=server.url, synth.model=server.name ...)

    python -m ipt.synth.vllm wait http://127.0.0.1:8000/v1 --timeout 900 --pid 1234

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` command reads
the metadata of a distribution named `vllm`, which the CPU build's `vllm-cpu` is not), in a
process group of its own, so that stopping it stops its engine processes too. On a machine
without a GPU, `VLLM_CPU_KVCACHE_SPACE` (GB of KV cache) defaults to 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx

ROOT = Path(__file__).resolve().parents[3]


def python() -> Path:
    """The vLLM virtualenv's interpreter: `IPT_VLLM_PYTHON`, else `.venv-vllm` of the repo."""
    return Path(os.environ.get("IPT_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")


class ServerError(RuntimeError):
    pass


class Server:
    """A vLLM OpenAI-compatible server on loopback, serving `model` as `name`."""

    def __init__(self, model: str | Path, name: str = "synth", port: int = 0,
                 args: tuple[str, ...] = (), log: Path | None = None,
                 startup_timeout_s: float = 900.0, env: dict[str, str] | None = None) -> None:
        self.model, self.name, self.args = str(model), name, args
        self.port = port or free_port()
        self.log = log
        self.startup_timeout_s = startup_timeout_s
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.started_s: float | None = None  # seconds from launch to serving

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [str(python()), "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model, "--served-model-name", self.name,
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self) -> Server:
        exe = python()
        if not exe.exists():
            raise ServerError(f"{exe} not found: `make vllm` builds vLLM's virtualenv "
                              "(or set IPT_VLLM_PYTHON to an interpreter that has vLLM)")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **self.env}
        begun = time.perf_counter()
        with self.log.open("ab") if self.log else open(os.devnull, "wb") as out:
            self.proc = subprocess.Popen(self.command(), env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait(self.url, self.startup_timeout_s, lambda: self.proc is not None and
                 self.proc.poll() is not None)
        except ServerError as e:
            self.stop()
            tail = self.log.read_text(errors="replace")[-3000:] if self.log else ""
            raise ServerError(f"{e}\n{tail}") from None
        self.started_s = time.perf_counter() - begun
        return self

    def kill(self) -> None:
        """End it at once, as a crash or a lost node would (SIGKILL to its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to its process group, then SIGKILL if it is still there after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, timeout_s: float, ended: Callable[[], bool] | None = None) -> None:
    """Return once the server at `url` (its `/v1` base) answers `/health` with 200; raise if
    `timeout_s` passes first, or `ended()` says its process ended before it served."""
    health = url.rstrip("/").removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout_s
    while True:
        if ended is not None and ended():
            raise ServerError(f"the server exited before serving {url}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(health, timeout=5.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ServerError(f"{url} did not become healthy within {timeout_s:.0f} s")
        time.sleep(1.0)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def main() -> None:
    p = argparse.ArgumentParser(description="Wait until a vLLM server serves.")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="exit 0 once URL/health answers, 1 on timeout or exit")
    w.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    w.add_argument("--timeout", type=float, default=900.0)
    w.add_argument("--pid", type=int, help="fail as soon as this process (the server) ends")
    a = p.parse_args()
    try:
        wait(a.url, a.timeout, None if a.pid is None else lambda: gone(a.pid))
    except ServerError as e:
        print(f"ipt: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
