"""The synthesize stage: raw documents to documents with instruction-response pairs.

The source is read in its fixed order and cut into groups of `docs_per_shard` records.
Group `k` becomes `shards/shard_k.jsonl` (one record per document, in input order),
`rejects/shard_k.jsonl` (records the source could not read) and last `parts/shard_k.json`,
its accounting and completion mark. Group k belongs to worker `k % num_workers`, so hosts
split a corpus with no coordination but a shared folder. Every file is written whole under a
temporary name of its writer's own (host and pid), then renamed: hosts started together
never write into one file. The first to start writes the settings (`stage.json`); the
others compare theirs with them. Each writes `summary.json` from the finished groups' marks
when it is done, and reads them again after writing, so the last written has seen them all.

The documents the prepare stage will hold out for validation (`valid_fraction`, the same id
hash, by the id the source gives: `ipt.synth.ids`) stay as they are (status `held_out`):
never synthesized, chained or tuned on, so that evaluation on them (`ipt.synth.rc_tasks`)
measures what a model never saw in any form.

Within a group, the documents chosen for synthesis (a `fraction`, by id hash) are split into
`rounds`. Document j of round r is chained to document j of round r-1: the earlier texts
and their pairs go before it in the prompt as finished examples, while the prompt fits the
context (spec section 3). A document inherits from its predecessor when it was chained and
its own generation parsed into at least one pair; the chain goes on from it only then.

How the requests go out depends on the backend. A local model (`run_batched`) takes each
round's prompts at once, in batches of like length. A server (`run_concurrent`) is kept
`concurrency` requests busy: a chain's next document is sent the moment its predecessor's
generation is back, so its prompt, which begins with the predecessor's, meets that prefix in
the server's cache, and the next group's chains start while a group's last ones finish. The
records are the same either way.

Ids key the chains, the links (`prev`) and what a re-run keeps, so they are made unique
in the run: a document repeating an earlier one's id (a URL often repeats) is kept as
`<id>#2`, `#3`, ..., with `input_id` in its record (`ipt.synth.ids`). Every worker reads the
whole source in its fixed order, so each names a repeat the same way, on every re-run too.

A killed run goes on where it stopped: finished groups are skipped, and generations already
paid for are in `cache/shard_k.jsonl` (each written as it arrives), keyed by a hash of the
prompt. A server that stops answering stops the run (`ServerGone`, exit 75), to be continued
the same way. A re-run also retries the documents whose generation failed (a timeout, a
refused prompt), and only those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ipt.config import ConfigError, SynthesizeConfig
from ipt.data import pairs as fmt
from ipt.data import sources as src
from ipt.data.pairs import Pair
from ipt.hosts import publish, worker_share
from ipt.synth import backends
from ipt.synth.backend import Backend, Concurrent, Request, Result, ServerGone
from ipt.synth.cache import Cache, NoCache
from ipt.synth.ids import RenamedDoc, held_out, unique_ids

log = logging.getLogger(__name__)

SAFETY_TOKENS = 8  # slack for token counts that are not exactly additive at the seams
# Requests per call of a local backend, in units of its batch: enough to keep it busy, few
# enough that a kill loses little before the cache has them.
CHUNK_PER_SLOT = 4
# Groups a server's client has open at once: the next one starts while one's chains finish.
MAX_OPEN_GROUPS = 3


# What became of a document: pairs, none parsed, generation failed, left raw, held out.
STATUSES = ("ok", "no_pairs", "failed", "raw", "held_out")


@dataclass(frozen=True)
class Entry:
    """One link of a chain: a text as the synthesizer read it, and its pairs."""

    id: str
    text: str
    pairs: list[Pair]


def chosen(doc_id: str, fraction: float, seed: int) -> bool:
    """Whether a document is synthesized: a hash of its id, the same on every machine."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


@dataclass
class Link:
    """A document of a chain, its prompt made, waiting for its generation."""

    run: GroupRun
    slot: int  # the chain: document `slot` of every round
    round: int
    doc: src.Doc
    chain: list[Entry]  # the finished examples before it in the prompt
    request: Request


class GroupRun:
    """One group's chains, advanced link by link as generations arrive.

    Slot j's chain is document j of round 0, then of round 1, and so on. `start` gives the
    first link of every chain that needs a generation, and `complete` takes a generation and
    gives its chain's next link. On the way, documents kept from an earlier run, and
    generations already in the cache, are recorded without a request. `write` writes the
    group once `finished`.
    """

    def __init__(self, backend: Backend, cfg: SynthesizeConfig, k: int,
                 records: list[src.Record]) -> None:
        self.backend, self.cfg, self.k = backend, cfg, k
        self.name = f"shard_{k:05d}"
        out = Path(cfg.out)
        self.docs = [r for r in records if isinstance(r, src.Doc)]
        self.rejects = [r for r in records if isinstance(r, src.Reject)]
        self.previous = _read_shard(out / "shards" / f"{self.name}.jsonl") \
            if cfg.retry_failed else {}
        self.cache = NoCache() if backend.name == "rules" else \
            Cache(out / "cache" / f"{self.name}.jsonl",
                  f"{backend.name}|{backend.cfg.max_new_tokens}|{backend.cfg.temperature}")
        self.held = {d.id for d in self.docs if held_out(d, cfg.valid_fraction)}
        picked = [d for d in self.docs
                  if d.id not in self.held and chosen(d.id, cfg.fraction, cfg.seed)]
        per_round = math.ceil(len(picked) / max(1, cfg.rounds)) if picked else 0
        self.slots = [picked[j::per_round] for j in range(per_round)]
        self.chains: list[list[Entry]] = [[] for _ in self.slots]
        self.next = [0] * len(self.slots)
        self.records: dict[str, dict] = {}
        self.waiting = 0  # links handed out whose generation has not come back
        self.budget = text_budget(backend)

    def start(self) -> list[Link]:
        return [link for j in range(len(self.slots)) if (link := self._advance(j))]

    def complete(self, link: Link, result: Result) -> Link | None:
        self.waiting -= 1
        self.cache.put(link.request.prompt, result)
        self._record(link, result)
        return self._advance(link.slot)

    @property
    def finished(self) -> bool:
        return self.waiting == 0 and all(
            n == len(s) for n, s in zip(self.next, self.slots, strict=True))

    def _advance(self, j: int) -> Link | None:
        """Slot j's next link that needs a generation, if any."""
        s = self.backend.cfg
        while self.next[j] < len(self.slots[j]):
            r, doc, chain = self.next[j], self.slots[j][self.next[j]], self.chains[j]
            self.next[j] += 1
            old = self.previous.get(doc.id)
            if old is not None and old["status"] != "failed":  # kept from an earlier run
                self.records[doc.id] = old
                pairs = [Pair(**p) for p in old["pairs"]]
                entry = Entry(doc.id, doc.text[:old["read_chars"]], pairs)
                self.chains[j] = ((chain if old["prev"] else []) + [entry]) if pairs else []
                continue
            text = self.backend.truncate(doc.text, self.budget)
            prompt = fmt.prompt(text, [(e.text, e.pairs) for e in chain])
            if chain and self.backend.count_tokens(prompt) + s.max_new_tokens > s.context:
                chain, prompt = [], fmt.prompt(text)  # does not fit: the chain breaks here
            link = Link(self, j, r, doc, chain, Request(doc.id, text, prompt))
            cached = self.cache.get(prompt)
            if cached is None:
                self.waiting += 1
                return link
            self._record(link, cached)
        return None

    def _record(self, link: Link, result: Result) -> None:
        rec = record(link.doc, link.request, result, link.round, link.chain, self.backend.name,
                     self.cfg.source.name)
        self.records[link.doc.id] = rec
        pairs = [Pair(**p) for p in rec["pairs"]]
        self.chains[link.slot] = link.chain + [Entry(link.doc.id, link.request.text, pairs)] \
            if pairs else []

    def write(self) -> dict[str, Any]:
        """Write the group's shard, rejects and last its completion mark; its accounting."""
        out, cfg = Path(self.cfg.out), self.cfg
        self.cache.close()
        rows = [self.records.get(d.id) or
                {"id": d.id, "source": cfg.source.name, "text": d.text,
                 "status": "held_out" if d.id in self.held else "raw", "pairs": [],
                 "synthesizer": self.backend.name}
                for d in self.docs]
        for row, d in zip(rows, self.docs, strict=True):
            if isinstance(d, RenamedDoc):
                row["input_id"] = d.input_id  # to join the record back to its source
        publish(out / "shards" / f"{self.name}.jsonl",
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        publish(out / "rejects" / f"{self.name}.jsonl",
                "".join(json.dumps({"id": r.id, "reason": r.reason}) + "\n"
                        for r in self.rejects))
        part = account(self.k, rows, self.rejects, self.backend)
        publish(out / "parts" / f"{self.name}.json", json.dumps(part))  # the completion mark
        return part


def text_budget(backend: Backend) -> int:
    """The tokens of a text that fit the context with the generation and the markup."""
    s = backend.cfg
    budget = s.context - s.max_new_tokens - backend.count_tokens(fmt.context("")) - SAFETY_TOKENS
    if s.max_text_tokens is not None:
        budget = min(budget, s.max_text_tokens)
    if budget <= 0:
        raise ConfigError(f"synth.context={s.context} leaves no room for a text after "
                          f"synth.max_new_tokens={s.max_new_tokens}")
    return budget


def run_batched(run: GroupRun) -> dict[str, Any]:
    """A local backend: every ready link at once, in chunks its batches fill (round by
    round, so a batch holds prompts of like length), each chunk cached as it returns."""
    c = run.backend.cfg
    size = CHUNK_PER_SLOT * c.batch_size if c.kind == "hf" else sys.maxsize
    ready = run.start()
    while ready:
        chunk, ready = ready[:size], ready[size:]
        results = run.backend.generate([link.request for link in chunk])
        ready += [n for link, res in zip(chunk, results, strict=True)
                  if (n := run.complete(link, res))]
    return run.write()


def run_concurrent(backend: Concurrent, runs: Iterator[GroupRun],
                   done: Callable[[dict[str, Any]], None]) -> None:
    """A server: `concurrency` requests in flight at every moment there is work.

    A chain's next link is sent the moment its predecessor returns, ahead of any other, so
    its prompt, which begins with the predecessor's, finds that prefix still in the server's
    cache; and the next group's first links fill the slots while a group's last chains finish,
    so no group waits for another's slowest request. When `give_up` requests in a row cannot
    reach the server, the run stops (`ServerGone`): the groups in flight are not written, and
    the generations they had are in the cache for the re-run.
    """
    ready: deque[Link] = deque()
    flying: dict[Future[Result], Link] = {}
    open_runs: list[GroupRun] = []
    give_up = max(8, 2 * backend.concurrency)
    unreachable, more = 0, True
    try:
        while True:
            while len(flying) < backend.concurrency:
                if not ready and more and len(open_runs) < MAX_OPEN_GROUPS:
                    run = next(runs, None)
                    if run is None:
                        more = False
                        continue
                    ready.extend(run.start())
                    if run.finished:
                        done(run.write())
                    else:
                        open_runs.append(run)
                    continue
                if not ready:
                    break
                link = ready.popleft()
                flying[backend.submit(link.request)] = link
            if not flying:
                return
            arrived, _ = wait(flying, return_when=FIRST_COMPLETED)
            for f in arrived:
                link, result = flying.pop(f), f.result()
                unreachable = unreachable + 1 if result.unreachable else 0
                if unreachable >= give_up:
                    raise ServerGone(
                        f"{backend.cfg.url} stopped answering: {unreachable} requests in a row "
                        f"failed ({result.error}); the finished groups and every generation "
                        "that arrived are kept, so the same command continues the run")
                if (n := link.run.complete(link, result)) is not None:
                    ready.appendleft(n)
                if link.run.finished:
                    open_runs.remove(link.run)
                    done(link.run.write())
    finally:
        for f in flying:
            f.cancel()
        for run in open_runs:
            run.cache.close()


def synthesize_group(backend: Backend, cfg: SynthesizeConfig, k: int,
                     records: list[src.Record]) -> dict[str, Any]:
    run = GroupRun(backend, cfg, k, records)
    if not isinstance(backend, Concurrent):
        return run_batched(run)
    parts: list[dict[str, Any]] = []
    run_concurrent(backend, iter([run]), parts.append)
    return parts[0]


def record(doc: src.Doc, req: Request, res: Result, round_: int, chain: list[Entry],
           synthesizer: str, source: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": doc.id, "source": source, "text": doc.text, "round": round_,
                           "prev": chain[-1].id if chain else None, "synthesizer": synthesizer,
                           "read_chars": len(req.text), "truncated": len(req.text) < len(doc.text)}
    if res.tokens is not None:
        rec["generated_tokens"] = res.tokens
    if res.text is None:
        return {**rec, "status": "failed", "pairs": [], "inherited": False, "error": res.error}
    parsed = fmt.parse(res.text)
    rec |= {"status": "ok" if parsed.pairs else "no_pairs",
            "pairs": [p.to_json() for p in parsed.pairs],
            "inherited": bool(chain) and bool(parsed.pairs), "finish": res.finish,
            "drops": dict(parsed.drops)}
    if not parsed.pairs:
        rec["generation"] = res.text[:2000]  # to see why nothing parsed
    return rec


def account(k: int, rows: list[dict], rejects: list[src.Reject],
            backend: Backend) -> dict[str, Any]:
    status = Counter(r["status"] for r in rows)
    drops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    pair_tokens = 0
    for r in rows:
        drops.update(r.get("drops", {}))
        if r.get("error"):
            errors[r["error"].split(":")[0].split(" (")[0]] += 1
        pairs = [Pair(**p) for p in r["pairs"]]
        kinds.update(p.kind for p in pairs)
        if pairs:
            pair_tokens += backend.count_tokens(fmt.render_pairs(pairs))
    return {"group": k, "records": len(rows) + len(rejects), "docs": len(rows),
            "rejected": len(rejects), **{s: status[s] for s in STATUSES},
            "pairs": sum(kinds.values()), "pair_tokens": pair_tokens,
            "inherited": sum(bool(r.get("inherited")) for r in rows),
            "generated_tokens": sum(r.get("generated_tokens", 0) for r in rows),
            "truncated": sum(bool(r.get("truncated")) for r in rows),
            "renamed_ids": sum("input_id" in r for r in rows),
            "kinds": dict(kinds), "drops": dict(drops), "errors": dict(errors)}


def _read_shard(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def groups(cfg: SynthesizeConfig) -> Iterator[list[src.Record]]:
    records = src.read(cfg.source)
    if cfg.max_docs is not None:
        records = islice(records, cfg.max_docs)
    records = unique_ids(records)
    while batch := list(islice(records, cfg.docs_per_shard)):
        yield batch


# valid_fraction among them: another value would hold out other documents in the groups
# still to do than in the groups done.
SETTINGS = ("rounds", "fraction", "valid_fraction", "docs_per_shard", "max_docs", "seed")


def check_settings(cfg: SynthesizeConfig, synthesizer: str) -> None:
    """An output folder holds one run's settings; continuing it with others would mix them.
    The first worker to get here writes them (hosts may start together); the rest compare."""
    path = Path(cfg.out) / "stage.json"
    now = {"source": cfg.source.path, "synthesizer": synthesizer,
           "context": cfg.synth.context, "max_new_tokens": cfg.synth.max_new_tokens,
           "temperature": cfg.synth.temperature,
           **{k: getattr(cfg, k) for k in SETTINGS}}
    if publish(path, json.dumps(now, indent=1), once=True):
        return
    then = json.loads(path.read_text())
    if "valid_fraction" not in then:
        raise ConfigError(f"out={cfg.out} was written by an older ipt, which held documents "
                          "out by their renamed ids (x#2) rather than the source's: write to "
                          "a new out (its cache/ folder of generations can be copied there)")
    if diff := [f"{k}: {then.get(k)!r} -> {v!r}" for k, v in now.items() if then.get(k) != v]:
        raise ConfigError(f"out={cfg.out} holds a run with other settings "
                          f"({'; '.join(diff)}); continue it with the same settings or "
                          "write to a new out")


def synthesize(cfg: SynthesizeConfig) -> dict[str, Any]:
    """Run (or continue) the stage for this worker's groups; returns the summary."""
    if cfg.rounds < 1 or cfg.docs_per_shard < 1:
        raise ConfigError("rounds and docs_per_shard must be >= 1")
    if not 0 < cfg.fraction <= 1:
        raise ConfigError(f"fraction={cfg.fraction} must be in (0, 1]")
    if not 0 <= cfg.valid_fraction < 1:
        raise ConfigError(f"valid_fraction={cfg.valid_fraction} must be in [0, 1)")
    cfg.source.name = cfg.source.name or Path(cfg.source.path).stem
    src.check(cfg.source)
    index, count = worker_share(cfg.worker_index, cfg.num_workers)
    out = Path(cfg.out)
    backend = backends.build(cfg.synth)  # fails fast on a bad model folder or URL
    for folder in ("shards", "rejects", "parts", "server"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    check_settings(cfg, backend.name)
    skip = _finished(out, cfg.retry_failed)
    bar = _progress(cfg)
    started, n_docs, n_pairs, total_groups = time.perf_counter(), 0, 0, 0
    n_groups, n_tokens = 0, 0
    pool = ProcessPoolExecutor(cfg.workers, initializer=_init_worker, initargs=(cfg.synth,)) \
        if cfg.workers > 1 else None
    in_flight: list[Future] = []

    def finish(part: dict[str, Any]) -> None:
        nonlocal n_docs, n_pairs, n_groups, n_tokens
        n_docs, n_pairs = n_docs + part["docs"], n_pairs + part["pairs"]
        n_groups, n_tokens = n_groups + 1, n_tokens + part["generated_tokens"]
        seconds = time.perf_counter() - started
        if bar is not None:
            bar.update(part["records"])
            bar.set_postfix(docs_s=f"{n_docs / seconds:.1f}",
                            pairs_doc=f"{n_pairs / max(1, n_docs):.2f}",
                            failed=part["failed"])
        else:  # a log line a group, for a job's log
            log.info("group %d done (%d this run): %d documents, %.1f docs/s, %.0f generated "
                     "tokens/s, %.2f pairs/doc, %d failed", part["group"], n_groups, n_docs,
                     n_docs / seconds, n_tokens / seconds, n_pairs / max(1, n_docs),
                     part["failed"])

    def mine() -> Iterator[tuple[int, list[src.Record]]]:
        nonlocal total_groups
        for k, group in enumerate(groups(cfg)):
            total_groups = k + 1
            if k % count == index and k not in skip:
                yield k, group

    counters = getattr(backend, "metrics", None)
    before = counters() if counters is not None else None
    try:
        if pool is not None:
            for k, group in mine():
                in_flight.append(pool.submit(_pool_group, cfg, k, group))
                while len(in_flight) >= 2 * cfg.workers:
                    finish(in_flight.pop(0).result())
            for f in in_flight:
                finish(f.result())
        elif isinstance(backend, Concurrent):
            run_concurrent(backend, (GroupRun(backend, cfg, k, g) for k, g in mine()), finish)
        else:
            for k, group in mine():
                finish(synthesize_group(backend, cfg, k, group))
        if before is not None and counters is not None and (after := counters()) is not None:
            delta = {k: after[k] - before.get(k, 0.0) for k in after}
            publish(out / "server" / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.json",
                    json.dumps({"worker": index, "seconds": time.perf_counter() - started,
                                "url": cfg.synth.url, "counters": delta}))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
        backend.close()
    summary = summarize(out, total_groups, backend.name)
    if summary.get("renamed_ids"):
        log.warning("%d documents repeat an earlier document's id; each is kept as <id>#<n>, "
                    "with input_id in its record", summary["renamed_ids"])
    return summary


def _finished(out: Path, retry_failed: bool) -> set[int]:
    done = set()
    for p in (out / "parts").glob("shard_*.json"):
        part = json.loads(p.read_text())
        if not (retry_failed and part["failed"]):
            done.add(part["group"])
    return done


_backend: Backend | None = None


def _init_worker(synth_cfg: Any) -> None:
    global _backend
    _backend = backends.build(synth_cfg)


def _pool_group(cfg: SynthesizeConfig, k: int, group: list[src.Record]) -> dict[str, Any]:
    assert _backend is not None, "worker not initialised"
    return synthesize_group(_backend, cfg, k, group)


def _progress(cfg: SynthesizeConfig) -> Any:
    if cfg.progress_bar == "never" or (cfg.progress_bar == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(desc=f"synthesize {cfg.source.name}", unit="doc", dynamic_ncols=True)


def summarize(out: Path, total_groups: int, synthesizer: str) -> dict[str, Any]:
    """Write `summary.json`, the finished groups added up. Hosts that finish together each
    write what they see; a group may finish (or be redone) while one adds up, so each reads
    them again after writing and writes again until nothing changed in between. The last
    summary written has then seen every group finished before it."""
    summary = add_up(out, total_groups, synthesizer)
    while True:
        publish(out / "summary.json", json.dumps(summary, indent=1))
        now = add_up(out, total_groups, synthesizer)
        if now == summary:
            return summary
        summary = now


def add_up(out: Path, total_groups: int, synthesizer: str) -> dict[str, Any]:
    """The finished groups' accounting; every record read is a document or a reject."""
    total: Counter[str] = Counter()
    by: dict[str, Counter[str]] = {"kinds": Counter(), "drops": Counter(), "errors": Counter()}
    parts = sorted((out / "parts").glob("shard_*.json"))
    for p in parts:
        part = json.loads(p.read_text())
        part.pop("group")
        for key, counter in by.items():
            counter.update(part.pop(key))
        total.update(part)
    if total["docs"] + total["rejected"] != total["records"] or \
            sum(total[s] for s in STATUSES) != total["docs"]:
        raise RuntimeError(f"{out}: records do not add up: {dict(total)}")
    tried = total["ok"] + total["no_pairs"]
    return {"synthesizer": synthesizer, "groups_done": len(parts),
            "groups_total": max(total_groups, len(parts)), **dict(total),
            "parse_rate": round(total["ok"] / tried, 4) if tried else None,
            "pairs_per_doc": round(total["pairs"] / tried, 3) if tried else None,
            "tokens_per_pair": round(total["pair_tokens"] / total["pairs"], 1)
            if total["pairs"] else None,
            **{k: dict(v.most_common()) for k, v in by.items()},
            **server_counters(out)}


def server_counters(out: Path) -> dict[str, Any]:
    """What the server counted while this output's runs used it (each run's `/metrics`
    before and after, `server/`): the prompt tokens its prefix cache served, and all."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "server").glob("*.json"))]
    if not runs:
        return {}
    total: Counter[str] = Counter()
    for r in runs:
        total.update({k.removeprefix("vllm:"): v for k, v in r["counters"].items()})
    queries, hits = total["prefix_cache_queries"], total["prefix_cache_hits"]
    return {"server": {"runs": len(runs), "seconds": round(sum(r["seconds"] for r in runs), 1),
                       **{k: int(v) for k, v in sorted(total.items())},
                       "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None}}

