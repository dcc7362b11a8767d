"""The data path at scale: what a start costs each rank as the corpus grows, ipt's loader beside
the one it replaced (commit 5b0339f: every rank packed every shard in Python and held each
epoch's order as a table), in the same run.

    .venv/bin/python bench/loader_scale.py [--sizes 0.25e9,1e9,4e9] [--ranks 2,8]
        [--corpora /tmp/ipt-loader-scale] [--no-train]

Synthetic corpora in ipt's shard format (random tokens of the demo tokenizer's vocabulary,
log-normal document lengths, median about 665 tokens), written once and kept in `--corpora`.
For each size and loader, `R` rank processes start at once, as a node's ranks do; each opens
the training data at `seq_len` 2048 (best-fit packing) and reads its first micro-batch, then
its micro-batch a billion samples in (a resume far into a run). Each reports the seconds from
its start to each batch, its peak RSS and its private memory (USS, the pages no other process
shares). The new loader runs cold (no index yet: the first rank builds it, the rest wait) and
warm (the index there). Last, a real 2-step `train/pretrain.py` run on 2 ranks on the demo
corpus and on each corpus (indexes built), and on the largest with the baseline's code, for
its wall time and its larger rank's peak RSS and peak private memory.

`make bench ARGS=loader-scale` runs it with the defaults. It needs about 10 GB of disk and a
few minutes (the old loader at 4B tokens is most of it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ipt.data.shards import FORMAT

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = "5b0339f"  # the loader before issue 26
SHARD_TOKENS = 1 << 28
SEQ_LEN = 2048
FAR = 10**9  # the sample a resume starts at
CORPORA = Path(tempfile.gettempdir()) / "ipt-loader-scale"  # kept between runs


def write_corpus(out: Path, tokens: int, vocab: int, fingerprint: str, seed: int = 0) -> Path:
    """A source folder (`train/`) of about `tokens` tokens in ipt's shard format, written
    directly (the prepare stage would take hours here); reused if already complete."""
    train = out / "train"
    done = out / "complete.json"
    if done.exists() and json.loads(done.read_text()) == {"tokens": tokens, "vocab": vocab,
                                                           "tokenizer": fingerprint}:
        return out
    shutil.rmtree(out, ignore_errors=True)
    train.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    written, k = 0, 0
    while written < tokens:
        want = min(SHARD_TOKENS, tokens - written)
        lens = np.clip(rng.lognormal(6.5, 1.0, int(want / 1000) + 16).astype(np.int64), 4, None)
        lens = lens[: int(np.searchsorted(np.cumsum(lens), want)) + 1]
        ends = np.cumsum(lens).astype(np.uint64)
        ids = rng.integers(3, vocab, int(ends[-1]), dtype=dtype)
        stem = train / f"shard_{k:05d}"
        ids.tofile(f"{stem}.tokens")
        ends.tofile(f"{stem}.docs")
        h = hashlib.sha256(ids.tobytes())  # as ShardWriter hashes: the tokens, then the ends
        h.update(ends.tobytes())
        meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab,
                "tokenizer": fingerprint, "source": "web", "channels": {},
                "num_tokens": int(ends[-1]), "num_docs": len(ends),
                "content_hash": h.hexdigest()}
        (train.parent / "train" / f"shard_{k:05d}.json").write_text(json.dumps(meta))
        written += int(ends[-1])
        k += 1
    done.write_text(json.dumps({"tokens": tokens, "vocab": vocab, "tokenizer": fingerprint}))
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM: unlike getrusage's maximum, not
    inherited from the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def overrides(tokenizer: Path, source: Path, run_dir: Path, world: int) -> list[str]:
    return [f"tokenizer={tokenizer}", "data=custom", f"data.sources.web.path={source}",
            f"data.seq_len={SEQ_LEN}", "model.max_seq_len=2048", f"run_dir={run_dir}",
            "train.micro_batch_size=2", f"train.global_batch_size={2 * world}",
            "train.max_steps=2",
            "train.eval_every=0", "train.checkpoint_every=1000", "train.export_at_end=false",
            "logger.plot=false", "logger.progress_bar=never", "data.num_workers=0"]


def rank(args: argparse.Namespace) -> None:
    """One rank's start: open the training data, read the first and a far micro-batch."""
    started = float(args.started)
    import psutil
    from hydra import compose, initialize_config_dir

    import ipt
    from ipt.config import register, to_object
    from ipt.data import tokenizer as tok
    from ipt.data.sampling import Packed, open_train

    assert ipt.__file__.startswith(args.code), f"{ipt.__file__} is not the code under test"

    register()
    with initialize_config_dir(str(Path(args.code) / "configs"), version_base=None):
        cfg = to_object(compose("pretrain", overrides=overrides(
            Path(args.tokenizer), Path(args.source), Path(args.run_dir), args.world)))
    imported = time.time()
    sampling = Packed(cfg)
    data = open_train(cfg, tok.fingerprint(cfg.tokenizer), sampling)
    opened = time.time()
    world, r = args.world, args.rank
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    first = next(iter(sampling.batches(data, 0, micro, r, world, pin_memory=False)))
    got_first = time.time()
    far = next(iter(sampling.batches(data, FAR, micro, r, world, pin_memory=False)))
    got_far = time.time()
    for batch in (first, far):  # the old loader's batches held input_ids, today's one tensor
        assert batch.get("packed", batch.get("input_ids")).shape[-1] == SEQ_LEN
    print(json.dumps({
        "import_s": imported - started, "open_s": opened - imported,
        "first_batch_s": got_first - started, "far_batch_s": got_far - got_first,
        "peak_rss_mb": peak_rss_mb(),
        "uss_mb": psutil.Process().memory_full_info().uss / 2**20,
        "sequences": len(data.dataset)}), flush=True)
    os._exit(0)  # the loaders' prefetch threads are still waiting to fill their queues


def start_ranks(code: Path, tokenizer: Path, source: Path, world: int) -> list[dict]:
    """`world` rank processes of the loader in `code` (a source tree), started at once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code / "src")}
    with tempfile.TemporaryDirectory() as run_dir:
        procs = [subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--rank", str(r), "--world",
             str(world), "--code", str(code), "--tokenizer", str(tokenizer), "--source",
             str(source), "--run-dir", run_dir, "--started", repr(time.time())],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(world)]
        out = []
        for p in procs:
            stdout, stderr = p.communicate()
            if p.returncode:
                raise RuntimeError(f"a rank of {code} failed:\n{stderr[-3000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def summary(ranks: list[dict]) -> dict:
    keys = ("first_batch_s", "far_batch_s", "open_s", "peak_rss_mb", "uss_mb")
    return {k: round(max(r[k] for r in ranks), 2) for k in keys} | {
        "sequences": ranks[0]["sequences"]}


def baseline_tree(where: Path) -> Path:
    """The source tree of the baseline commit, checked out once into `where`."""
    tree = where / f"ipt-{BASELINE}"
    if not (tree / "train").is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE, "src", "configs",
                                  "train"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def train_run(tokenizer: Path, source: Path, demo: bool, code: Path = ROOT) -> dict:
    """A real 2-step `train/pretrain.py` run on 2 ranks, after one that builds what it needs:
    its wall time, and the peak RSS and peak private memory (USS) of its larger rank. RSS
    counts the page cache's pages of the shards and indexes that a rank has mapped, which
    every rank shares; USS counts only the rank's own."""
    import psutil

    args = [f"tokenizer={tokenizer}", "train.max_steps=2", "train.eval_every=0",
            "train.checkpoint_every=1000", "train.export_at_end=false", "logger.plot=false",
            "logger.progress_bar=never", "train.resume=never"]
    args += ["data=demo", f"data.root={source}"] if demo else \
        ["data=custom", f"data.sources.web.path={source}"]
    for _ in range(2):  # the first builds the indexes, the second is measured
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.time()
            proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", str(code / "train" / "pretrain.py"), *args,
                 f"run_dir={run_dir}"], cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code / "src")},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            rss: dict[int, float] = {}
            uss: dict[int, float] = {}
            while proc.poll() is None:
                for c in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                        m = c.memory_full_info()
                        rss[c.pid] = max(rss.get(c.pid, 0), m.rss / 2**20)
                        uss[c.pid] = max(uss.get(c.pid, 0), m.uss / 2**20)
                time.sleep(0.05)
            wall = time.time() - start
            if proc.returncode:
                raise RuntimeError(f"pretrain failed:\n{proc.stderr.read()[-3000:]}")
            proc.stderr.close()
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(max(rss.values())),
            "peak_uss_mb": round(max(uss.values()))}


def run(sizes: tuple[float, ...] = (0.25e9, 1e9, 4e9), ranks: tuple[int, ...] = (2, 8),
        corpora: Path = CORPORA, train: bool = True, demo: Path | None = None) -> list[dict]:
    """The measurements (see the module docstring); `demo` is the demo's data folder, built
    if not given (its tokenizer is the corpora's)."""
    from ipt.config import DemoDataConfig
    from ipt.data import tokenizer as tok
    from ipt.data.demo import build_demo_data

    demo = demo or build_demo_data(DemoDataConfig(out=str(ROOT / "data" / "demo")))
    tokenizer = demo / "tokenizer"
    vocab, fp = len(tok.load(tokenizer)), tok.fingerprint(tokenizer)
    old = baseline_tree(corpora)
    results = []
    for size in sizes:
        source = write_corpus(corpora / f"web-{size:g}", int(size), vocab, fp)
        for world in ranks:
            row = {"benchmark": f"loader start, {size:g} tokens, {world} ranks",
                   "old": summary(start_ranks(old, tokenizer, source, world))}
            shutil.rmtree(source / "train" / "index", ignore_errors=True)
            row["cold"] = summary(start_ranks(ROOT, tokenizer, source, world))
            row["warm"] = summary(start_ranks(ROOT, tokenizer, source, world))
            print(json.dumps(row), flush=True)
            results.append(row)
    if train:
        row = {"benchmark": "2-step train/pretrain.py on 2 ranks, indexes built",
               "demo": train_run(tokenizer, demo, True)}
        for size in sizes:
            row[f"{size:g} tokens"] = train_run(tokenizer, corpora / f"web-{size:g}", False)
        row[f"{max(sizes):g} tokens, {BASELINE}"] = train_run(
            tokenizer, corpora / f"web-{max(sizes):g}", False, old)
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.25e9,1e9,4e9")
    p.add_argument("--ranks", default="2,8", help="rank counts of the loader's starts; '' "
                   "for none (the training runs only)")
    p.add_argument("--corpora", default=str(CORPORA))
    p.add_argument("--no-train", action="store_true")
    args = p.parse_args()
    results = run(tuple(float(s) for s in args.sizes.split(",")),
                  tuple(int(r) for r in args.ranks.split(",") if r), Path(args.corpora),
                  not args.no_train)
    out = HERE / "results" / "loader_scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def rank_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    for name in ("--code", "--tokenizer", "--source", "--run-dir", "--started"):
        p.add_argument(name)
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    return p.parse_args()


if __name__ == "__main__":
    rank(rank_args()) if "--rank" in sys.argv else main()
