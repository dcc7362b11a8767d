"""Synthesizer throughput, each against its baseline in the same run.

- `hf`: batched generation (length-sorted, left-padded batches) against one document at a
  time, same model, prompts and greedy tokens.
- `openai`: the client at increasing concurrency against the server's own limit: all prompts
  in one request, generated in the server's largest batches with no HTTP round trips.
- `rules`: documents/s on one core, the whole stage (read, mine, write) and the miner alone.
- `vllm` (with `make vllm`; `make bench ARGS=synth-vllm`): the synthesize stage (read, prompt,
  send, parse, write) against a real vLLM server, in output tokens/s, against vLLM's own
  offline engine (`LLM.generate`, bench/vllm_offline.py) on the same prompts and greedy
  generations; at several `synth.concurrency`. Then chained rounds 1-3 with vLLM's prefix
  caching on and off: the hit rate the stage's summary reads from `/metrics`, and the speed.

The model is the demo's tiny synthesizer when `make train` has built it, else a random tiny
Llama of the same shape (speed does not depend on the weights, only on how many tokens are
generated, which both sides of each comparison share).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from ipt.config import ModelConfig, SourceConfig, SynthBackendConfig, SynthesizeConfig
from ipt.data import pairs as fmt
from ipt.data import tokenizer as tok
from ipt.model import build_model
from ipt.synth import vllm
from ipt.synth.backend import Request, TokenCounter
from ipt.synth.backends import RulesBackend
from ipt.synth.hf import Generator
from ipt.synth.openai import OpenAIBackend
from ipt.synth.rules import Miner
from ipt.synth.server import make_server
from ipt.synth.stage import GroupRun, synthesize


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


# The vLLM arms: the demo synthesizer's settings (`make train`), on the demo's docstrings.
VLLM_SYNTH = {"context": 512, "max_text_tokens": 128, "max_new_tokens": 128}
# The server batches as the offline engine does: vLLM's CPU defaults are 256 sequences and 4,096
# tokens a step offline, but 128 and 2,048 for its server.
SERVE = ("--dtype", "float32", "--max-num-seqs", "256", "--max-num-batched-tokens", "4096")


def stage_prompts(docs: Path, model: Path, tmp: Path) -> list[str]:
    """The prompts the synthesize stage sends for `docs` in one round, made by its own code."""
    counter = RulesBackend(SynthBackendConfig(kind="rules", tokenizer=str(model), **VLLM_SYNTH))
    cfg = SynthesizeConfig(source=SourceConfig(name="docs", path=str(docs), id_field="id"),
                           out=str(tmp / "unused"), rounds=1, valid_fraction=0.0,
                           docs_per_shard=10**9)
    from ipt.data import sources as src

    run = GroupRun(counter, cfg, 0, list(src.read(cfg.source)))
    return [link.request.prompt for link in run.start()]


def stage_run(docs: Path, out: Path, url: str, model: Path, concurrency: int,
              rounds: int = 1, new: int = VLLM_SYNTH["max_new_tokens"],
              ignore_eos: bool = False) -> dict:
    synth = SynthBackendConfig(
        kind="openai", url=url, model="synth", tokenizer=str(model), concurrency=concurrency,
        **{**VLLM_SYNTH, "max_new_tokens": new},
        extra_body={"add_special_tokens": False, **({"ignore_eos": True} if ignore_eos else {})})
    cfg = SynthesizeConfig(source=SourceConfig(name="docs", path=str(docs), id_field="id"),
                           out=str(out), synth=synth, rounds=rounds, valid_fraction=0.0,
                           progress_bar="never")
    start = time.perf_counter()
    summary = synthesize(cfg)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "generated_tokens": summary["generated_tokens"],
            "tokens_s": summary["generated_tokens"] / seconds, "docs_s": summary["docs"] / seconds,
            "parse_rate": summary["parse_rate"], "server": summary["server"]}


def reset_prefix_cache(url: str) -> None:
    import httpx

    r = httpx.post(url.removesuffix("/v1") + "/reset_prefix_cache", timeout=60)
    r.raise_for_status()


def vllm_stage_vs_offline(data: Path, model: Path, tmp: Path, n: int = 512,
                          concurrency: tuple[int, ...] = (16, 64, 256)) -> list[dict]:
    """The stage's output tokens/s against vLLM's offline engine on the same prompts: the
    synthesizer's own outputs (greedy, to EOS or 128 tokens), and 256 tokens each (EOS
    ignored), nearer the 260 tokens of the paper's five pairs a document."""
    docs = tmp / "docs.jsonl"
    docs.write_text("".join((data / "raw" / "docstrings.jsonl").open().readlines()[:n]))
    prompts = stage_prompts(docs, model, tmp)
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    shapes = {"own_length": (VLLM_SYNTH["max_new_tokens"], False), "256_tokens": (256, True)}
    own = {name: offline(model, tmp, new, ignore) for name, (new, ignore) in shapes.items()}
    out = []
    with vllm.Server(model, args=SERVE, log=tmp / "server.log",
                     env={"VLLM_SERVER_DEV_MODE": "1"}) as server:
        for name, (new, ignore) in shapes.items():
            result: dict = {"benchmark": "synth_vllm_stage_vs_offline_engine", "docs": n,
                            "outputs": name, "server_start_s": server.started_s,
                            "offline_tokens_s": own[name]["tokens_s"],
                            "offline_generated_tokens": own[name]["generated_tokens"]}
            for c in concurrency:
                reset_prefix_cache(server.url)  # each run starts as cold as the offline one
                run = stage_run(docs, tmp / f"stage_{name}_c{c}", server.url, model, c,
                                new=new, ignore_eos=ignore)
                assert run["generated_tokens"] == own[name]["generated_tokens"], \
                    "the stage and the offline engine must generate the same tokens"
                result[f"stage_tokens_s_concurrency_{c}"] = run["tokens_s"]
                result[f"ratio_concurrency_{c}"] = run["tokens_s"] / own[name]["tokens_s"]
            out.append(result)
    return out


def offline(model: Path, tmp: Path, new: int, ignore_eos: bool) -> dict:
    """bench/vllm_offline.py in vLLM's virtualenv, on tmp/prompts.json."""
    import subprocess

    result = tmp / f"offline_{new}_{ignore_eos}.json"
    subprocess.run([str(vllm.python()), str(Path(__file__).parent / "vllm_offline.py"),
                    "--model", str(model), "--prompts", str(tmp / "prompts.json"),
                    "--max-tokens", str(new), "--out", str(result),
                    *(["--ignore-eos"] if ignore_eos else [])],
                   check=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dict(json.loads(result.read_text()))


def vllm_prefix_caching(data: Path, model: Path, tmp: Path, n: int = 512,
                        concurrency: int = 64, repeats: int = 2) -> list[dict]:
    """Chained rounds 1-3 against vLLM with its prefix caching off, on at the CPU build's
    default block of 128 tokens, and on at 32 (the CPU's smallest; GPUs default to 16): only
    whole blocks are reused. Each point is the fastest of `repeats` runs, the cache emptied
    before each, after a warm-up run on other documents."""
    lines = (data / "raw" / "docstrings.jsonl").open().readlines()
    docs, warm = tmp / "chain_docs.jsonl", tmp / "warm_docs.jsonl"
    docs.write_text("".join(lines[-n:]))
    warm.write_text("".join(lines[-n - 128:-n]))
    settings = {"off": ("--no-enable-prefix-caching",), "on_block_128": (),
                "on_block_32": ("--block-size", "32")}
    out = []
    for name, extra in settings.items():
        with vllm.Server(model, args=(*SERVE, *extra), log=tmp / f"server_{name}.log",
                         env={"VLLM_SERVER_DEV_MODE": "1"}) as server:
            stage_run(warm, tmp / f"warm_{name}", server.url, model, concurrency)
            for rounds in (1, 2, 3):
                runs = []
                for i in range(repeats):
                    reset_prefix_cache(server.url)
                    runs.append(stage_run(docs, tmp / f"chain_{name}_{rounds}_{i}", server.url,
                                          model, concurrency, rounds))
                run = min(runs, key=lambda r: r["seconds"])
                out.append({"benchmark": "synth_vllm_prefix_caching", "docs": n,
                            "prefix_caching": name, "rounds": rounds,
                            "concurrency": concurrency, "seconds": run["seconds"],
                            "seconds_all": [round(r["seconds"], 2) for r in runs],
                            "tokens_s": run["tokens_s"], "docs_s": run["docs_s"],
                            "parse_rate": run["parse_rate"],
                            "prompt_tokens": run["server"].get("prompt_tokens"),
                            "prefix_cache_hits": run["server"].get("prefix_cache_hits"),
                            "prefix_cache_hit_rate": run["server"]["prefix_cache_hit_rate"]})
    return out


def run_vllm(data: Path) -> list[dict]:
    if not vllm.python().exists():
        return [{"benchmark": "synth_vllm", "skipped": f"{vllm.python()} not found: make vllm"}]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = model_dir(data, tmp)
        return [*vllm_stage_vs_offline(data, model, tmp), *vllm_prefix_caching(data, model, tmp)]
