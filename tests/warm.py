"""Warm starts for the tests' training runs: one server process imports the training stack
(torch, transformers, DeepSpeed, Hydra, ipt) once per test session, then forks every rank of
every run from itself, as `torchrun --standalone` would start them.

Why: a tiny training run spends about four fifths of its wall time starting Python and
importing libraries (docs/benchmarks.md, CI's time). Each rank forked from the server is still
a real process that runs the entry point's `__main__` with its own arguments, environment,
working directory and rank variables, and meets the other ranks through a real gloo rendezvous
and a real DeepSpeed engine; only the import is shared. The fork happens before any of those
libraries has started a thread or run a kernel, which is what makes it safe.

What stays on real launchers: the tests of `torchrun` and the launch scripts themselves
(preemption, SLURM, `launch/`), and any run whose environment differs from the server's in a
variable read at import time (`Warm.supports` decides; such a run starts cold, as before).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

# What the server imports before it forks: everything the entry points import on their way to
# the first step (the Llama model is behind transformers' lazy loader, DeepSpeed behind ipt's).
# The harness is imported as `ipt.evaluate.require_harness` does, offline.
PRELOAD = ("hydra", "omegaconf", "torch", "torch.distributed", "deepspeed", "transformers",
           "transformers.models.llama.modeling_llama", "ipt.cli", "ipt.config", "ipt.pretrain",
           "ipt.sweep", "ipt.export", "ipt.evaluate", "ipt.slm.score", "ipt.mtp.decode",
           "lm_eval", "lm_eval.tasks", "lm_eval.models.huggingface")
# Variables a library reads once, at import: a run that sets any of them differently from the
# server cannot share the server's imports, and starts cold.
READ_AT_IMPORT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_LOGS", "PYTHONHASHSEED",
                  "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE",
                  "HF_DATASETS_OFFLINE",
                  "DS_ACCELERATOR", "DS_BUILD_OPS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH",
                  "TORCH_EXTENSIONS_DIR", "HOME", "XDG_CACHE_HOME")
KILL_GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(env: dict[str, str], rank: int, world: int, port: int) -> dict[str, str]:
    """The variables `torchrun --standalone --nproc_per_node=world` gives a worker."""
    return {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world), "ROLE_NAME": "default",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "warm", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}


def _run_rank(script: str, args: list[str], env: dict[str, str], cwd: str, out: int,
              err: int) -> None:
    """In a forked child: become the entry point's `__main__` and exit as a process would."""
    os.setsid()  # its own group: killing the run kills what the rank started too
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` sets it
    code: Any = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - a process prints what killed it and exits 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code or 0)


def _stop(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


class _Run:
    """One run's ranks, forked from the server, and how each has ended so far."""

    def __init__(self, req: dict[str, Any]) -> None:
        self.world, self.timeout = req["nproc"], req["timeout"]
        # closed in `wait`, once read
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
        port = _free_port()
        sys.stdout.flush()
        sys.stderr.flush()
        self.ranks: dict[int, int] = {}  # pid -> rank
        for rank in range(self.world):
            env = (_rank_env(req["env"], rank, self.world, port) if self.world > 1
                   else dict(req["env"]))
            pid = os.fork()
            if pid == 0:
                _run_rank(req["script"], req["args"], env, req["cwd"], self.out.fileno(),
                          self.err.fileno())
            self.ranks[pid] = rank
        self.codes: dict[int, int] = {}
        self.deadline = time.monotonic() + self.timeout
        self.kill_at: float | None = None
        self.timed_out = False

    def running(self) -> set[int]:
        return {p for p, r in self.ranks.items() if r not in self.codes}

    def poll(self) -> bool:
        """Reap what has ended and act as torchrun would; True once every rank has ended."""
        for pid in self.running():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.codes[self.ranks[pid]] = os.waitstatus_to_exitcode(status)
                if self.codes[self.ranks[pid]] != 0 and self.kill_at is None:
                    _stop(self.running(), signal.SIGTERM)  # the first failure stops the rest
                    self.kill_at = time.monotonic() + KILL_GRACE_S
        now = time.monotonic()
        if self.running() and now > self.deadline:
            self.timed_out = True
            _stop(self.running(), signal.SIGKILL)
        if self.running() and self.kill_at is not None and now > self.kill_at:
            _stop(self.running(), signal.SIGKILL)
        return not self.running()

    def wait(self) -> dict[str, Any]:
        while not self.poll():
            time.sleep(0.01)
        _stop(set(self.ranks), signal.SIGKILL)  # whatever the ranks left behind
        failed = any(c != 0 for c in self.codes.values())
        res = {"returncode": self.codes[0] if self.world == 1 else int(failed),
               "timed_out": self.timed_out}
        for name, f in (("stdout", self.out), ("stderr", self.err)):
            f.seek(0)
            res[name] = f.read()
            f.close()
        return res


def serve(address: str) -> None:
    """The server's loop: preload, then start, poll and wait for runs as the one client that
    connects asks."""
    from ipt.evaluate import require_harness

    require_harness()
    for name in PRELOAD:
        __import__(name)
    runs: dict[int, _Run] = {}
    with Listener(address, family="AF_UNIX") as listener, listener.accept() as conn:
        while True:
            try:
                op, arg = conn.recv()
            except EOFError:
                return
            if op == "start":  # a run is known by its rank 0's pid
                run = _Run(arg)
                pids = sorted(run.ranks, key=run.ranks.__getitem__)
                runs[pids[0]] = run
                conn.send(pids)
            elif op == "poll":
                conn.send(runs[arg].poll())
            else:
                conn.send(runs.pop(arg).wait())


class Warm:
    """A client of one server: `start` is `subprocess.Popen` for an entry point's ranks."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.env = env
        self.dir = tempfile.mkdtemp(prefix="ipt-warm-")
        address = os.path.join(self.dir, "socket")
        self.log = open(os.path.join(self.dir, "server.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-c",
                                      f"from tests.warm import serve; serve({address!r})"],
                                     cwd=root, env=env, stdout=self.log, stderr=self.log)
        self.conn: Connection | None = None
        self.address = address

    def _connect(self) -> Connection:
        deadline = time.monotonic() + 120
        while self.conn is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the warm server exited: {Path(self.log.name).read_text()}")
            try:
                self.conn = Client(self.address, family="AF_UNIX")
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return self.conn

    def supports(self, env: dict[str, str]) -> bool:
        return all(env.get(k) == self.env.get(k) for k in READ_AT_IMPORT)

    def _ask(self, op: str, arg: Any) -> Any:
        conn = self._connect()
        conn.send((op, arg))
        return conn.recv()

    def start(self, script: str, args: list[str], nproc: int, env: dict[str, str], cwd: Path,
              timeout: float) -> WarmProcess:
        req = {"script": script, "args": list(args), "nproc": nproc, "env": dict(env),
               "cwd": str(cwd), "timeout": timeout}
        return WarmProcess(self, [script, *args], timeout, self._ask("start", req))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc.kill()
        self.log.close()


class WarmProcess:
    """A run started by the server, read as `subprocess.Popen` is: `pids` are its ranks (in
    rank order), each the leader of its own process group; once it has ended, `returncode`,
    `stdout` and `stderr` hold how it ended and what it printed."""

    def __init__(self, warm: Warm, args: list[str], timeout: float, pids: list[int]) -> None:
        self.warm, self.args, self.timeout, self.pids = warm, args, timeout, pids
        self.returncode: int | None = None
        self.stdout = self.stderr = ""

    def poll(self) -> int | None:
        if self.returncode is None and self.warm._ask("poll", self.pids[0]):
            self._ended(self.warm._ask("wait", self.pids[0]))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and (timeout is None or timeout >= self.timeout):
            self._ended(self.warm._ask("wait", self.pids[0]))  # the server keeps the time
        deadline = time.monotonic() + (timeout or 0)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def _ended(self, res: dict[str, Any]) -> None:
        self.stdout = res["stdout"].decode(errors="replace")
        self.stderr = res["stderr"].decode(errors="replace")
        self.returncode = res["returncode"]  # the server has forgotten the run: it has ended
        if res["timed_out"]:  # the server's deadline: `timeout` from the start
            raise subprocess.TimeoutExpired(self.args, self.timeout, self.stdout, self.stderr)

    def send_signal(self, sig: int) -> None:
        """To every rank, as SLURM signals every process of a step."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        _stop(set(self.pids), signal.SIGKILL)
