"""Shared fixtures: a small real corpus (Python docstrings), its sentencepiece tokenizer and
token shards, built once per session; and a helper that runs the real training entry point,
as one process or under torchrun, in a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ipt.config import DemoDataConfig
from ipt.data.demo import build_demo_data

from .warm import Warm, WarmProcess

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser) -> None:
    parser.addoption("--vllm", action="store_true",
                     help="run the tests against a real vLLM server (make test-vllm)")


def pytest_collection_modifyitems(config, items) -> None:
    """The vLLM tests need vLLM's own virtualenv (`make vllm`): `make test-vllm` runs them."""
    if config.getoption("--vllm"):
        return
    skip = pytest.mark.skip(reason="a real vLLM server: `make test-vllm` runs these")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    return build_demo_data(DemoDataConfig(out=str(out), max_docs=600, vocab_size=512,
                                          valid_fraction=0.05, workers=1))


def tiny_overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A ~100k-parameter Llama on 64-token sequences: seconds per run on CPU."""
    base = {
        "name": run_dir.name, "run_dir": str(run_dir), "data.root": str(data_dir),
        "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2,
        "model.num_heads": 4, "model.num_kv_heads": 2, "model.max_seq_len": 64,
        "data.seq_len": 64, "data.num_workers": 0,
        "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.max_steps": 8,
        "train.eval_every": 4, "train.eval_batches": 2, "train.checkpoint_every": 4,
        "logger.log_every": 1, "logger.plot": False, "logger.progress_bar": "never",
        "train.export_at_end": False, "schedule.warmup_steps": 2, "optim.lr": 3e-3,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def pretrain_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    script = str(ROOT / "train" / "pretrain.py")
    if nproc == 1:
        return [sys.executable, script, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", script, *overrides]


_warm: Warm | None = None


def run_env(**extra: str) -> dict[str, str]:
    """The environment of the tests' runs, as it is now (a test may have changed it): one
    thread per rank, output as it happens, and the Hugging Face libraries offline from the
    start. (`ipt.evaluate` turns them offline before it imports the harness; a test that calls
    it in this process sets those variables here, and a run whose import-time variables differ
    from the warm server's would start cold.)"""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def warm() -> Warm | None:
    """The session's warm server (tests/warm.py), started on first use; None under
    IPT_TEST_COLD=1, which starts every run as a fresh process instead."""
    global _warm
    if _warm is None and os.environ.get("IPT_TEST_COLD") != "1":
        _warm = Warm(ROOT, run_env())
    return _warm


# How the session's runs started: a run starts cold only where a test changed a variable
# read at import (tests/warm.py), so many cold starts mean the server is being missed
STARTS = {"warm": 0, "cold": 0}


def pytest_terminal_summary(terminalreporter) -> None:
    if any(STARTS.values()):
        terminalreporter.write_line(f"training runs started: {STARTS['warm']} warm, "
                                    f"{STARTS['cold']} cold (tests/warm.py)")


@pytest.fixture(scope="session", autouse=True)
def _close_warm():
    yield
    if _warm is not None:
        _warm.close()


def start_entry(script: str, args: list[str], nproc: int = 1, env: dict[str, str] | None = None,
                timeout: float = 600) -> WarmProcess | subprocess.Popen:
    """Start an entry point (`train/pretrain.py`, ...) on `nproc` ranks, as torchrun would,
    warm where it can; its output goes to files (a pipe nobody reads would stall it)."""
    env = run_env(**(env or {}))
    server = warm()
    if server is not None and server.supports(env):
        STARTS["warm"] += 1
        return server.start(str(ROOT / script), args, nproc, env, ROOT, timeout)
    STARTS["cold"] += 1
    cmd = [sys.executable, str(ROOT / script), *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(ROOT / script), *args]
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 - see output
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out,
                            stderr=err)
    proc.outputs = (out, err)  # type: ignore[attr-defined]
    return proc


def kill_run(proc: WarmProcess | subprocess.Popen) -> None:
    """SIGKILL every process of a run that `start_entry` started, and reap it."""
    if isinstance(proc, WarmProcess):
        proc.kill()
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait()


def run_entry(script: str, args: list[str], nproc: int = 1, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run` of an entry point on `nproc` ranks, as torchrun starts them."""
    proc = start_entry(script, args, nproc, env, timeout)
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_run(proc)  # on a time-out; otherwise what the ranks left behind
    return subprocess.CompletedProcess(proc.args, proc.returncode, *output(proc))


def output(proc: WarmProcess | subprocess.Popen) -> tuple[str, str]:
    """What a run from `start_entry` printed (stdout, stderr), once it has ended."""
    if isinstance(proc, WarmProcess):
        return proc.stdout, proc.stderr
    texts = []
    for f in proc.outputs:  # type: ignore[attr-defined]
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
    return texts[0], texts[1]


def run_pretrain(overrides: list[str], nproc: int = 1, check: bool = True,
                 timeout: int = 600) -> subprocess.CompletedProcess:
    proc = run_entry("train/pretrain.py", overrides, nproc, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_lm(data_dir, tmp_path_factory) -> Path:
    """A random-init tiny Llama saved as a Hugging Face folder with the test tokenizer."""
    import torch

    from ipt.config import ModelConfig
    from ipt.data import tokenizer as tok
    from ipt.model import build_model

    out = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = tok.load(data_dir / "tokenizer")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", hidden_size=64, intermediate_size=128,
                                    num_layers=2, num_heads=4, num_kv_heads=2,
                                    max_seq_len=1024), len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def wandb_records(run_file: Path):
    """The records of an offline wandb run file (`run-<id>.wandb`), as wandb's own protobuf
    `Record`s. wandb 0.31 (the newest release) has no reader for the file, in Python or on its
    command line, and no offline API (`wandb.beta.LocalApi`, proposed in wandb/wandb#12745,
    should replace this once released). So the LevelDB-log framing (32 KiB blocks, 7-byte
    chunk headers) is read here, after checking the file's magic; the records inside are
    parsed by wandb's own schema."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, header = Path(run_file).read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{run_file} is not a wandb run file"
    pos, chunks = header, []
    while pos + header <= len(data):
        if block - pos % block < header:
            pos += block - pos % block  # a block's tail too short for a header is padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:
            break
        chunks.append(data[pos + header:pos + header + length])
        pos += header + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def scored_copy(data_dir: Path, slm: Path, root: Path, **options: Any) -> tuple[Path, dict]:
    """A copy of the session's tokenizer and its two sources under `root`, put through the
    scoring stage with the small LM `slm` and `ScoreConfig` options (the shared data stays
    as it is); the copy, and what the stage returned."""
    from ipt.config import ScoreConfig
    from ipt.slm.score import score

    shutil.copytree(data_dir / "tokenizer", root / "tokenizer")
    sources = ("docstrings", "packages")
    for n in sources:
        shutil.copytree(data_dir / "shards" / n, root / "shards" / n)
    out = score(ScoreConfig(slm=str(slm), tokenizer=str(root / "tokenizer"), seq_len=64,
                            sources={n: str(root / "shards" / n) for n in sources},
                            progress_bar="never", **options))
    return root, out


def bpe_tokenizer(data_dir: Path, out: Path) -> Path:
    """A byte-level BPE tokenizer with an EOS and no BOS, as Qwen's, trained on the demo
    docstrings."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator((json.loads(x)["text"] for x in lines), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(out)
    return out
