"""The model backends for real: a local transformers model, and an OpenAI-compatible server
on loopback serving that same model, healthy and misbehaving."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from ipt.config import ConfigError, SourceConfig, SynthBackendConfig, SynthesizeConfig
from ipt.synth import backends
from ipt.synth.backend import Request, Result, ServerGone
from ipt.synth.backends import RulesBackend
from ipt.synth.hf import Generator
from ipt.synth.openai import read_counters
from ipt.synth.server import make_server
from ipt.synth.stage import GroupRun, groups, run_batched, run_concurrent, synthesize
from ipt.synth.vllm import Server, ServerError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tiny_lm):
    srv = make_server(str(tiny_lm), port=0, max_batch=8)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_port}/v1"


def openai_cfg(srv, tiny_lm, **kw) -> SynthBackendConfig:
    return SynthBackendConfig(kind="openai", url=url(srv), tokenizer=str(tiny_lm), context=1024,
                              max_new_tokens=8, concurrency=4,
                              **{"model": "local", "retries": 0, "backoff_s": 0.01, **kw})


def stage_cfg(data_dir, tmp_path, synth, n=24, **kw) -> SynthesizeConfig:
    lines = (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()[:n]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    return SynthesizeConfig(source=SourceConfig(name="docs", path=str(tmp_path / "in.jsonl"),
                                                id_field="id"),
                            out=str(tmp_path / "out"), synth=synth, progress_bar="never",
                            **{"docs_per_shard": 12, "rounds": 2, **kw})


def rows(out) -> list[dict]:
    return [json.loads(line) for f in sorted((Path(out) / "shards").glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def prompts(data_dir, n: int) -> list[str]:
    docs = [json.loads(line)["text"] for line in
            (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()[:n]]
    return [f"<s> <CON> {t[:300 + 97 * i]} </CON>\n\n" for i, t in enumerate(docs)]


def test_batched_generation_equals_one_prompt_at_a_time(tiny_lm, data_dir):
    gen = Generator(str(tiny_lm), device="cpu")
    ps = prompts(data_dir, 6)  # different lengths: left padding must not change a token
    assert gen.complete(ps, 12, batch_size=6) == gen.complete(ps, 12, batch_size=1)


def test_the_server_answers_what_the_local_backend_generates(server, tiny_lm, data_dir):
    hf = backends.build(SynthBackendConfig(kind="hf", model=str(tiny_lm), max_new_tokens=8,
                                           device="cpu"))
    api = backends.build(openai_cfg(server, tiny_lm))
    reqs = [Request(str(i), "", p) for i, p in enumerate(prompts(data_dir, 5))]
    local, remote = hf.generate(reqs), api.generate(reqs)
    api.close()
    assert [r.text for r in remote] == [r.text for r in local]
    assert all(r.error is None and r.text for r in remote)


def test_a_server_that_is_not_up_or_serves_another_model_is_refused_at_start(
        server, tiny_lm, data_dir, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    synth = SynthBackendConfig(kind="openai", url=f"http://127.0.0.1:{port}/v1", model="local")
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}/v1 does not answer.*Connect"):
        synthesize(stage_cfg(data_dir, tmp_path, synth))
    with pytest.raises(ConfigError, match=r"synth.model='other' is not served .*\['local'\]"):
        synthesize(stage_cfg(data_dir, tmp_path, openai_cfg(server, tiny_lm, model="other")))
    assert server.requests_seen == 0 and not list((tmp_path / "out").rglob("shard_*"))


def test_a_server_gone_mid_run_stops_it_and_the_rerun_pays_only_for_the_rest(
        tiny_lm, data_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ipt.synth.server", "--model", str(tiny_lm),
                             "--port", "0", "--max-batch", "8"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout is not None
        served_at = proc.stdout.readline().split(" on ")[-1].strip()
        synth = SynthBackendConfig(kind="openai", url=served_at, model="local",
                                   tokenizer=str(tiny_lm), context=1024, max_new_tokens=8,
                                   concurrency=4, retries=1, backoff_s=0.01)
        cfg = stage_cfg(data_dir, tmp_path, synth, n=96)
        parts = Path(cfg.out) / "parts"

        def kill_after_two_groups() -> None:
            while len(list(parts.glob("*.json"))) < 2:
                time.sleep(0.01)
            proc.kill()

        threading.Thread(target=kill_after_two_groups, daemon=True).start()
        with pytest.raises(ServerGone, match="stopped answering: 8 requests in a row failed"):
            synthesize(cfg)
    finally:
        proc.kill()
        proc.wait()
    cached = sum(len(f.read_text().splitlines()) for f in (Path(cfg.out) / "cache").glob("*"))
    assert 2 <= len(list(parts.glob("*.json"))) < 8 and cached < 96
    second = make_server(str(tiny_lm), port=0, max_batch=8)  # the server restarted elsewhere
    threading.Thread(target=second.serve_forever, daemon=True).start()
    try:
        cfg.synth.url = url(second)
        summary = synthesize(cfg)
    finally:
        second.shutdown()
        second.server_close()
    assert summary["docs"] == 96 and summary["failed"] == 0
    assert second.served == 96 - summary["held_out"] - cached  # none paid for twice
    assert len({r["id"] for r in rows(cfg.out)}) == 96


def test_a_rerun_retries_only_the_documents_that_failed(server, tiny_lm, data_dir, tmp_path):
    server.fault = "flaky"  # every second request answers 500
    cfg = stage_cfg(data_dir, tmp_path, openai_cfg(server, tiny_lm))
    first = synthesize(cfg)
    kept = {r["id"]: r for r in rows(cfg.out) if r["status"] != "failed"}
    assert 0 < first["failed"] < 24
    server.fault, server.served = "none", 0
    second = synthesize(cfg)
    assert server.served == first["failed"]  # nothing paid twice
    assert second["failed"] == 0 and second["docs"] == 24
    again = {r["id"]: r for r in rows(cfg.out)}
    assert all(again[i] == r for i, r in kept.items())


def test_a_slow_server_times_out_into_a_recorded_failure(server, tiny_lm, data_dir, tmp_path):
    server.fault, server.slow_s = "slow", 3.0
    cfg = stage_cfg(data_dir, tmp_path, openai_cfg(server, tiny_lm, timeout_s=0.5), n=4,
                    docs_per_shard=4)
    summary = synthesize(cfg)
    assert summary["failed"] == 4
    assert all(r["error"].startswith("timed out after 0.5s") for r in rows(cfg.out))


def test_a_server_answering_garbage_fails_without_retrying(server, tiny_lm, data_dir, tmp_path):
    server.fault = "garbage"
    cfg = stage_cfg(data_dir, tmp_path, openai_cfg(server, tiny_lm, retries=3), n=4,
                    docs_per_shard=4)
    summary = synthesize(cfg)
    assert summary["failed"] == 4 and server.requests_seen == 4
    assert all("malformed response" in r["error"] for r in rows(cfg.out))


def test_a_killed_run_pays_again_only_for_what_was_in_flight(server, tiny_lm, data_dir,
                                                             tmp_path):
    cfg = stage_cfg(data_dir, tmp_path, openai_cfg(server, tiny_lm), n=96)
    server.slow_s, server.fault = 0.05, "slow"  # slow enough to be killed mid-run
    cmd = [sys.executable, "data_pipeline/synthesize.py", f"source.path={cfg.source.path}",
           "source.id_field=id", f"out={cfg.out}", "synth=openai", f"synth.url={url(server)}",
           "synth.model=local", f"synth.tokenizer={tiny_lm}", "synth.context=1024",
           "synth.max_new_tokens=8", "synth.concurrency=4", "synth.retries=0",
           "docs_per_shard=12", "rounds=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = Path(cfg.out) / "parts"
    deadline = time.time() + 120
    while len(list(parts.glob("*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cached = sum(len(f.read_text().splitlines()) for f in (Path(cfg.out) / "cache").glob("*"))
    assert 24 <= cached < 96, "the kill came too late to test anything"
    time.sleep(1)  # requests the dead client left in flight finish on the server
    server.fault, server.served = "none", 0
    summary = synthesize(cfg)
    assert server.served == 96 - summary["held_out"] - cached  # held-out ones never are
    assert summary["docs"] == 96 and summary["failed"] == 0
    assert len({r["id"] for r in rows(cfg.out)}) == 96


def test_a_model_folder_that_does_not_load_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="not a loadable model folder"):
        backends.build(SynthBackendConfig(kind="hf", model=str(tmp_path)))


class ShuffledRules(RulesBackend):
    """The rules miner behind `submit`, each answer after a random delay: links come back out
    of order, as a busy server's do."""

    def __init__(self, cfg: SynthBackendConfig) -> None:
        super().__init__(cfg)
        self.concurrency = 6
        self.pool = ThreadPoolExecutor(self.concurrency)
        self.rng = random.Random(0)

    def submit(self, request: Request) -> Future[Result]:
        delay = self.rng.uniform(0, 0.005)

        def answer() -> Result:
            time.sleep(delay)
            return self.generate([request])[0]

        return self.pool.submit(answer)


def test_streamed_chains_write_what_round_by_round_batches_write(data_dir, tmp_path):
    """Against a server the chains stream (a link sent as its predecessor returns, groups
    overlapping); against a local model they go round by round. The same records either way."""
    synth = SynthBackendConfig(kind="rules")
    written = []
    for name in ("batched", "streamed"):
        (tmp_path / name).mkdir()
        cfg = stage_cfg(data_dir, tmp_path / name, synth, n=60, rounds=3)
        backend = ShuffledRules(synth)
        runs = (GroupRun(backend, cfg, k, g) for k, g in enumerate(groups(cfg)))
        for folder in ("shards", "rejects", "parts"):
            (Path(cfg.out) / folder).mkdir(parents=True)
        if name == "batched":
            parts = [run_batched(run) for run in runs]
        else:
            parts = []
            run_concurrent(backend, runs, parts.append)
        assert sorted(p["group"] for p in parts) == [0, 1, 2, 3, 4]
        written.append(rows(cfg.out))
    assert written[0] == written[1]
    assert sum(bool(r.get("prev")) for r in written[0]) > 10  # chains formed


def test_the_servers_counters_are_read_from_its_prometheus_text():
    text = """# HELP vllm:prefix_cache_queries_total Prefix cache queries
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="synth"} 13523.0
vllm:prefix_cache_queries_created{engine="0",model_name="synth"} 1.7966820330312455e+09
vllm:prefix_cache_hits_total{engine="0",model_name="synth"} 3712.0
vllm:prefix_cache_hits_total{engine="1",model_name="synth"} 100.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="synth"} 61.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="synth"} 2.0
"""  # the lines of a vLLM 0.32 server's /metrics, a second engine added
    assert read_counters(text) == {"vllm:prefix_cache_queries": 13523.0,
                                   "vllm:prefix_cache_hits": 3812.0,
                                   "vllm:request_success": 63.0}
    assert read_counters("# nothing\n") is None


def test_waiting_for_a_vllm_server_that_never_serves_fails_and_says_why(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "ipt.synth.vllm", "wait",
                           f"http://127.0.0.1:{port}/v1", "--timeout", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "did not become healthy within 1 s" in proc.stderr
    dead = subprocess.Popen(["true"])
    dead.wait()
    proc = subprocess.run([sys.executable, "-m", "ipt.synth.vllm", "wait",
                           f"http://127.0.0.1:{port}/v1", "--pid", str(dead.pid)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "exited before serving" in proc.stderr
    monkeypatch.setenv("IPT_VLLM_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(ServerError, match="no-python not found: `make vllm`"):
        Server(str(tmp_path)).start()
