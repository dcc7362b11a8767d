"""Synthesizer throughput, each against its baseline in the same run.

- `hf`: batched generation (length-sorted, left-padded batches) against one document at a
  time, same model, prompts and greedy tokens.
- `openai`: the client at increasing concurrency against the server's own limit: all prompts
  in one request, generated in the server's largest batches with no HTTP round trips.
- `rules`: documents/s on one core, the whole stage (read, mine, write) and the miner alone.

The model is the demo's tiny synthesizer when `make train` has built it, else a random tiny
Llama of the same shape (speed does not depend on the weights, only on how many tokens are
generated, which both sides of each comparison share).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from ipt.config import ModelConfig, SourceConfig, SynthBackendConfig, SynthesizeConfig
from ipt.data import pairs as fmt
from ipt.data import tokenizer as tok
from ipt.model import build_model
from ipt.synth.backend import Request, TokenCounter
from ipt.synth.hf import Generator
from ipt.synth.openai import OpenAIBackend
from ipt.synth.rules import Miner
from ipt.synth.server import make_server
from ipt.synth.stage import synthesize


def model_dir(data: Path, tmp: Path) -> Path:
    demo = data.parent.parent / "runs" / "demo-synth" / "hf"
    if (demo / "config.json").exists():
        return demo
    tokenizer = tok.load(data / "tokenizer")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", hidden_size=128, intermediate_size=384,
                                    num_layers=4, num_heads=4, num_kv_heads=2,
                                    max_seq_len=1024), len(tokenizer))
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    return tmp / "model"


def prompts(data: Path, model: Path, n: int, max_tokens: int) -> list[str]:
    counter = TokenCounter(str(model), 3.0)
    texts = [json.loads(line)["text"] for line in
             (data / "raw" / "docstrings.jsonl").read_text().splitlines()[:n]]
    return [fmt.prompt(counter.truncate(t, max_tokens)) for t in texts]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_batched(model: Path, ps: list[str], new: int) -> dict:
    gen = Generator(str(model), device="cpu")
    gen.complete(ps[:2], 4, 2)  # warm-up
    one = timed(lambda: gen.complete(ps, new, batch_size=1))
    batched = timed(lambda: gen.complete(ps, new, batch_size=len(ps)))
    return {"benchmark": "synth_hf_batched_vs_one_at_a_time", "docs": len(ps),
            "max_new_tokens": new, "docs_s_one_at_a_time": len(ps) / one,
            "docs_s_batched": len(ps) / batched, "speedup": one / batched}


def openai_concurrency(model: Path, ps: list[str], new: int, max_batch: int = 16) -> dict:
    server = make_server(str(model), port=0, max_batch=max_batch, device="cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    result: dict = {"benchmark": "synth_openai_concurrency_vs_server_limit", "docs": len(ps),
                    "server_max_batch": max_batch}
    try:
        import httpx

        body = {"model": "local", "prompt": ps, "max_tokens": new, "temperature": 0}
        httpx.post(f"{url}/completions", json={**body, "prompt": ps[:2]}, timeout=600)
        limit = len(ps) / timed(lambda: httpx.post(f"{url}/completions", json=body, timeout=600))
        result["docs_s_server_limit"] = limit
        for c in (1, 4, 16):
            client = OpenAIBackend(SynthBackendConfig(kind="openai", url=url, model="local",
                                                      max_new_tokens=new, concurrency=c))
            reqs = [Request(str(i), "", p) for i, p in enumerate(ps)]
            rate = len(ps) / timed(lambda client=client, reqs=reqs: client.generate(reqs))
            client.close()
            result[f"docs_s_concurrency_{c}"] = rate
            result[f"ratio_to_limit_concurrency_{c}"] = rate / limit
    finally:
        server.shutdown()
        server.server_close()
    return result


def rules_per_core(data: Path, tmp: Path) -> dict:
    torch.set_num_threads(1)
    src = data / "raw" / "docstrings.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    miner = Miner()
    alone = timed(lambda: [miner.mine(r["text"], r["id"]) for r in rows])
    cfg = SynthesizeConfig(source=SourceConfig(name="docs", path=str(src), id_field="id"),
                           out=str(tmp / "rules"), progress_bar="never", docs_per_shard=2000)
    stage = timed(lambda: synthesize(cfg))
    return {"benchmark": "synth_rules_docs_per_core", "docs": len(rows),
            "docs_s_miner": len(rows) / alone, "docs_s_stage": len(rows) / stage}


def run(data: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = model_dir(data, tmp)
        torch.set_num_threads(2)
        ps = prompts(data, model, 32, 300)
        out = [hf_batched(model, ps, 64), openai_concurrency(model, ps, 64),
               rules_per_core(data, tmp)]
        out[0]["model"] = out[1]["model"] = str(model)
    return out
