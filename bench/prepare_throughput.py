"""The prepare stage against the tokenizer's own batch encoding, on the same text, same run.

- `tokens/s per worker`: the whole stage (start-up, read jsonl, tokenize, write shards,
  account) with 1 and 2 worker processes, against one `tokenizer(texts)` call over the same
  documents in this process (one thread: TOKENIZERS_PARALLELISM=false, as in the workers),
  on the demo's docstrings repeated 20 times (~24M tokens).
- `2 hosts`: two copies of the stage started at once on one output, splitting its groups
  (`worker_index`, `num_workers`), one worker process each, as two hosts would; here they
  share this machine's cores.
- `memory`: peak RSS of the stage (main process and workers) on the demo corpus and on a
  corpus 20x larger; streaming keeps them about equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def baseline_tokens_per_s(corpus: Path, tokenizer: Path) -> float:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from ipt.data.tokenizer import load

    tok = load(tokenizer)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    start = time.perf_counter()
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return sum(map(len, ids)) / (time.perf_counter() - start)


def run_stage(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    """The real entry point in a subprocess: wall time, tokens written, peak RSS."""
    cmd = [sys.executable, str(ROOT / "data_pipeline" / "prepare.py"), f"tokenizer={tokenizer}",
           f"out={out}", f"+sources.bench.path={corpus}", f"workers={workers}",
           "docs_per_shard=500", "progress_bar=never"]
    # A fresh wrapper per run: RUSAGE_CHILDREN's peak covers only this run's processes.
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
               "print(time.perf_counter() - t, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True,
                          capture_output=True, text=True, cwd=ROOT)
    wall_s, peak_kb = done.stdout.split()
    wall, peak = float(wall_s), int(peak_kb)
    summary = json.loads((out / "bench" / "summary.json").read_text())
    tokens = summary.get("train_tokens", 0) + summary.get("valid_tokens", 0)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "peak_rss_mb": peak / 1024}


def run_hosts(corpus: Path, tokenizer: Path, out: Path, hosts: int) -> dict:
    """`hosts` copies of the stage started at once on one output, splitting the groups as
    hosts do (`worker_index`, `num_workers`), one worker process each: wall time to the last."""
    cmd = [sys.executable, str(ROOT / "data_pipeline" / "prepare.py"), f"tokenizer={tokenizer}",
           f"out={out}", f"+sources.bench.path={corpus}", "workers=1", "docs_per_shard=500",
           "progress_bar=never", f"num_workers={hosts}"]
    start = time.perf_counter()
    procs = [subprocess.Popen([*cmd, f"worker_index={i}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(hosts)]
    if any(p.wait() for p in procs):
        raise RuntimeError("a host of the prepare stage failed")
    wall = time.perf_counter() - start
    summary = json.loads((out / "bench" / "summary.json").read_text())
    tokens = summary["train_tokens"] + summary["valid_tokens"]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def replicate(corpus: Path, out: Path, times: int) -> Path:
    lines = corpus.read_text().splitlines()
    with out.open("w") as f:
        for r in range(times):
            for line in lines:
                row = json.loads(line)
                row["id"] = f"{r}-{row['id']}"
                f.write(json.dumps(row) + "\n")
    return out


def run(data: Path) -> list[dict]:
    corpus, tokenizer = data / "raw" / "docstrings.jsonl", data / "tokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        big = replicate(corpus, t / "big.jsonl", 20)  # long enough that start-up is noise
        base = baseline_tokens_per_s(big, tokenizer)
        one = run_stage(big, tokenizer, t / "w1", 1)
        two = run_stage(big, tokenizer, t / "w2", 2)
        hosts = run_hosts(big, tokenizer, t / "h2", 2)
        small = run_stage(corpus, tokenizer, t / "small", 2)
    return [
        {"benchmark": "prepare_vs_batch_encode", "corpus_tokens": one["tokens"],
         "tokenizer_batch_encode_tokens_per_s": base,
         "prepare_1_worker_tokens_per_s": one["tokens_per_s"],
         "ratio_1_worker": one["tokens_per_s"] / base,
         "prepare_2_workers_tokens_per_s": two["tokens_per_s"],
         "scaling_2_workers": two["tokens_per_s"] / one["tokens_per_s"],
         "prepare_2_hosts_1_worker_each_tokens_per_s": hosts["tokens_per_s"],
         "scaling_2_hosts": hosts["tokens_per_s"] / one["tokens_per_s"]},
        {"benchmark": "prepare_memory_20x", "corpus_tokens_1x": small["tokens"],
         "corpus_tokens_20x": two["tokens"], "peak_rss_mb_1x": small["peak_rss_mb"],
         "peak_rss_mb_20x": two["peak_rss_mb"],
         "ratio_20x_vs_1x": two["peak_rss_mb"] / small["peak_rss_mb"]},
    ]
