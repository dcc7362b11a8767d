"""The synthesize stage against a real vLLM server (`make test-vllm`; vLLM's own virtualenv from
`make vllm`), serving the demo's synthesizer as ipt trained and exported it.

The oracle is the `hf` backend: the same exported model under `transformers`, greedy, on the
same documents. vLLM serves it in fp32 here, so greedy decoding should pick the same tokens;
where a near-tie resolves the other way, a document's pairs may differ, so the comparison
allows 1 document in 20 to differ and the parse rates to differ by 0.03 (measured: none
differed, 63 of 63 and 0.968 on both, on the demo's 64 package descriptions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipt.config import SourceConfig, SynthBackendConfig, SynthesizeConfig
from ipt.synth.stage import synthesize
from ipt.synth.vllm import Server
from ipt.synth.vllm import python as vllm_python

from .conftest import ROOT
from .test_slurm import DONE, slurm  # noqa: F401 - the fixture: a local SLURM cluster
from .test_slurm import job as slurm_job
from .test_slurm import wait as slurm_wait

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVE = ("--dtype", "float32")
# The demo's synthesize step, its settings as `make train` runs it.
SYNTH = {"context": 512, "max_text_tokens": 128, "max_new_tokens": 128}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """(demo data, exported synthesizer): `make demo-synth` in a scratch folder."""
    root = tmp_path_factory.mktemp("demo")
    data, synth = root / "data", root / "synth"
    proc = subprocess.run(["make", "-s", "demo-synth", f"DEMO_DATA={data}", f"DEMO_SYNTH={synth}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return data, synth / "hf"


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with Server(demo[1], args=SERVE, log=log) as srv:
        yield srv


def stage(demo, out: Path, synth: SynthBackendConfig, **kw) -> SynthesizeConfig:
    data, _ = demo
    return SynthesizeConfig(
        source=SourceConfig(name="packages", path=str(data / "raw" / "packages")),
        out=str(out), synth=synth, progress_bar="never", valid_fraction=0.05,
        **{"max_docs": 64, **kw})


def hf(demo) -> SynthBackendConfig:
    return SynthBackendConfig(kind="hf", model=str(demo[1]), device="cpu", **SYNTH)


def openai(demo, srv: Server, **kw) -> SynthBackendConfig:
    return SynthBackendConfig(kind="openai", url=srv.url, model=srv.name,
                              tokenizer=str(demo[1]), **{"concurrency": 16, **SYNTH, **kw})


def records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for f in sorted((out / "shards").glob("*.jsonl"))
            for r in map(json.loads, f.read_text().splitlines())}


def group(srv: Server, settle_s: float = 0.0) -> list[str]:
    """The live processes of the server's process group, after up to `settle_s` for them to
    end (an orphaned engine process takes a moment to be reaped)."""
    assert srv.proc is not None
    deadline = time.monotonic() + settle_s
    while True:
        rows = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True,
                              text=True).stdout.split("\n")
        live = [r.split()[0] for r in rows if len(r.split()) == 3 and
                r.split()[1] == str(srv.proc.pid) and not r.split()[2].startswith("Z")]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.2)


def assert_alike(served: Path, local: Path) -> None:
    """The served run's summary and records match the local (`hf`) run's."""
    a, b = json.loads((served / "summary.json").read_text()), \
        json.loads((local / "summary.json").read_text())
    assert a["docs"] == b["docs"] and a["failed"] == b["failed"] == 0
    assert abs(a["parse_rate"] - b["parse_rate"]) <= 0.03, (a["parse_rate"], b["parse_rate"])
    ra, rb = records(served), records(local)
    tried = [i for i in rb if rb[i]["status"] in ("ok", "no_pairs")]
    differ = [i for i in tried if ra[i]["pairs"] != rb[i]["pairs"]]
    assert len(differ) <= len(tried) / 20, f"{len(differ)} of {len(tried)} differ: {differ[:5]}"
    assert abs(a["pairs"] - b["pairs"]) <= max(2, b["pairs"] / 20)


def test_one_round_through_the_entry_point_matches_the_hf_backend(demo, server, tmp_path):
    local = tmp_path / "hf"
    synthesize(stage(demo, local, hf(demo), rounds=1))
    served = tmp_path / "vllm"
    cfg = stage(demo, served, openai(demo, server), rounds=1)
    cmd = [sys.executable, "data_pipeline/synthesize.py", f"source.path={cfg.source.path}",
           f"out={served}", "max_docs=64", "rounds=1", "valid_fraction=0.05", "synth=openai",
           f"synth.url={server.url}", f"synth.model={server.name}",
           f"synth.tokenizer={demo[1]}", "synth.concurrency=16",
           *(f"synth.{k}={v}" for k, v in SYNTH.items())]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_alike(served, local)
    summary = json.loads((served / "summary.json").read_text())
    tried = summary["ok"] + summary["no_pairs"]
    assert summary["server"]["request_success"] == tried  # one request a document, no retry
    assert summary["generated_tokens"] == summary["server"]["generation_tokens"]


def test_three_chained_rounds_match_the_hf_backend_and_reuse_their_prefixes(demo, server,
                                                                            tmp_path):
    synthesize(stage(demo, tmp_path / "hf", hf(demo), rounds=3))
    summary = synthesize(stage(demo, tmp_path / "vllm", openai(demo, server), rounds=3))
    assert_alike(tmp_path / "vllm", tmp_path / "hf")
    a, b = records(tmp_path / "vllm"), records(tmp_path / "hf")
    assert {i: r.get("prev") for i, r in a.items()} == {i: r.get("prev") for i, r in b.items()}
    assert summary["inherited"] > 0  # the chains formed
    cache = summary["server"]
    assert cache["prefix_cache_hits"] > 0 and 0 < cache["prefix_cache_hit_rate"] < 1


def test_a_killed_server_loses_nothing_and_repeats_no_paid_generation(demo, tmp_path):
    data, model = demo
    out = tmp_path / "vllm"
    source = data / "raw" / "docstrings.jsonl"
    args = [f"source.path={source}", "source.id_field=id", f"out={out}", "max_docs=400",
            "docs_per_shard=25", "rounds=2", "valid_fraction=0.05", "synth=openai",
            "synth.model=synth", f"synth.tokenizer={model}", "synth.concurrency=8",
            "synth.retries=1", "synth.backoff_s=0.1",
            *(f"synth.{k}={v}" for k, v in SYNTH.items())]
    first = Server(model, args=SERVE, log=tmp_path / "first.log").start()
    try:
        proc = subprocess.Popen([sys.executable, "data_pipeline/synthesize.py", *args,
                                 f"synth.url={first.url}"], cwd=ROOT, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        parts = out / "parts"
        deadline = time.time() + 300
        while len(list(parts.glob("*.json"))) < 3 and time.time() < deadline:
            time.sleep(0.05)
        first.kill()  # the server's whole process group, as a lost node
        _, err = proc.communicate(timeout=300)
    finally:
        first.kill()
    assert proc.returncode == 75, err[-3000:]  # launch/synthesize.sbatch requeues on 75
    assert "stopped answering" in err and "the same command continues the run" in err
    done = len(list(parts.glob("*.json")))
    cached = sum(len(f.read_text().splitlines()) for f in (out / "cache").glob("*.jsonl"))
    assert 3 <= done < 16, "the kill came too late to test anything"
    assert not group(first, settle_s=10)  # no engine process outlives the server
    with Server(model, args=SERVE, log=tmp_path / "second.log") as second:
        assert len(group(second)) >= 2  # the API server and its engine core
        proc2 = subprocess.run([sys.executable, "data_pipeline/synthesize.py", *args,
                                f"synth.url={second.url}"], cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
    assert not group(second, settle_s=10)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 400 and summary["failed"] == 0 and summary["groups_done"] == 16
    tried = summary["ok"] + summary["no_pairs"]
    assert summary["server"]["runs"] == 1  # the killed run never read the server's counters
    assert summary["server"]["request_success"] == tried - cached  # none paid for twice
    # and it wrote what one uninterrupted run writes
    whole = tmp_path / "hf"
    synthesize(SynthesizeConfig(
        source=SourceConfig(name="docstrings", path=str(source), id_field="id"), out=str(whole),
        synth=hf(demo), progress_bar="never", valid_fraction=0.05, max_docs=400,
        docs_per_shard=25, rounds=2))
    assert_alike(out, whole)


def submit(model: Path, args: list[str], log: Path, nodes: int = 2) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "VLLM_PYTHON": str(vllm_python()), "VLLM_ARGS": " ".join(SERVE),
           "VLLM_LOG_DIR": str(log.parent), "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run(["sbatch", "--parsable", f"--output={log}", "--chdir", str(ROOT),
                          f"--nodes={nodes}", "launch/synthesize.sbatch", str(model), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def sbatch_args(demo, out: Path) -> list[str]:
    return [f"source.path={demo[0] / 'raw' / 'docstrings.jsonl'}", "source.id_field=id",
            f"out={out}", "max_docs=400", "docs_per_shard=25", "rounds=2",
            "valid_fraction=0.05", "synth.concurrency=8",
            *(f"synth.{k}={v}" for k, v in SYNTH.items())]


@pytest.fixture(scope="module")
def whole(demo, tmp_path_factory) -> Path:
    """What the sbatch jobs must write: one uninterrupted run of the `hf` backend."""
    out = tmp_path_factory.mktemp("whole") / "hf"
    synthesize(SynthesizeConfig(
        source=SourceConfig(name="docstrings", path=str(demo[0] / "raw" / "docstrings.jsonl"),
                            id_field="id"),
        out=str(out), synth=hf(demo), progress_bar="never", valid_fraction=0.05, max_docs=400,
        docs_per_shard=25, rounds=2))
    return out


def assert_whole(out: Path, whole: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 400 and summary["groups_done"] == summary["groups_total"] == 16
    assert summary["failed"] == 0
    assert_alike(out, whole)
    # every generation paid for once: one cache line a document tried, no key twice
    keys = [json.loads(line)["key"] for f in (out / "cache").glob("*.jsonl")
            for line in f.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == summary["ok"] + summary["no_pairs"]
    return summary


@pytest.mark.usefixtures("slurm")
def test_sbatch_synthesizes_on_two_nodes_each_with_its_own_server(demo, whole, tmp_path):
    out, log = tmp_path / "synth", tmp_path / "job.out"
    job_id = submit(demo[1], sbatch_args(demo, out), log)
    info = slurm_wait(job_id, log, timeout=900)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-6000:]
    assert "node 0" in text and "node 1" in text and "share 1 of 2" in text
    summary = assert_whole(out, whole)
    assert {r["worker"] for r in map(json.loads, map(Path.read_text,
                                                     (out / "server").glob("*.json")))} == {0, 1}
    assert summary["server"]["runs"] == 2
    for node in (0, 1):  # each node stopped its server
        port = 8000 + int(job_id) % 1000 + node
        assert not subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True).stdout


@pytest.mark.usefixtures("slurm")
def test_a_preempted_sbatch_requeues_and_pays_for_nothing_twice(demo, whole, tmp_path):
    out, log = tmp_path / "synth", tmp_path / "job.out"
    job_id = submit(demo[1], sbatch_args(demo, out), log)
    deadline = time.monotonic() + 600
    while len(list((out / "parts").glob("*.json"))) < 3:
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        assert slurm_job(job_id)["JobState"] not in DONE, log.read_text()[-4000:]
        time.sleep(0.05)
    # what `--signal=USR1@<seconds>` sends before a time limit: SIGUSR1 to the job's steps
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    info = slurm_wait(job_id, log, timeout=900)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-6000:]
    assert "stopped by a signal" in text and "requeueing job" in text and "restart 1" in text
    assert_whole(out, whole)
