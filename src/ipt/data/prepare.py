"""The prepare stage: raw sources to token shards, in parallel, resumable, every record
accounted for.

Each source's records are cut, in their fixed order, into groups of `docs_per_shard`. Group
`k` becomes shard `k`: one worker process tokenizes it (BOS + text + EOS per document; no BOS
where the tokenizer has none) and writes `train/shard_k`, `valid/shard_k` (documents held
out by a hash of their id), and `rejects/shard_k.jsonl`. Last, it writes `parts/shard_k.json`,
the shard's accounting and its completion mark. A re-run skips every group that has its mark,
so a killed run goes on without redoing or duplicating anything. Memory stays flat: at most
two groups per worker are in flight.

Several hosts can share a source: group `k` is worker `k % num_workers`'s (`worker_index`,
`num_workers`, or the launcher's rank variables, as the synthesize stage). Each reads the
whole source and writes only its own groups, so the output is the same whatever the number
of hosts; the first to start writes `settings.json` (the others compare theirs with it) and
the last to finish writes `summary.json`.

The source's folder records in `settings.json` what its output depends on (tokenizer,
grouping, hold-out, the source and its files); a re-run with any of them changed is refused,
since it would skip or duplicate documents. Settings that only change how fast (workers) are
not recorded.

Output, per source: `{out}/{source}/{train,valid,rejects,parts}/`, `settings.json` and
`summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict
from itertools import accumulate, islice, pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ipt.config import ConfigError, PrepareConfig, SourceConfig
from ipt.data import sources as src
from ipt.data import tokenizer as tok
from ipt.data.shards import ShardWriter
from ipt.hosts import publish, worker_share

log = logging.getLogger(__name__)


def is_valid_doc(doc_id: str, fraction: float) -> bool:
    """Deterministic hold-out by id: the same documents on every run and machine."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def pieces(text: str, limit: int) -> list[str]:
    """Cut a long text into pieces of at most `limit` chars: after the last line break in
    reach, else before the last space (a word stays whole), else anywhere."""
    out, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind("\n", start, end) + 1 or text.rfind(" ", start + 1, end)
        cut = cut if cut > start else end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


Encoded = tuple[list[int], "np.ndarray | None"]  # token ids, and the loss mask if any
SEAM_MARGIN = 256  # characters either side of a cut that the windows around it share


class Window(NamedTuple):
    """The tokens of a stretch of a text: where each starts and ends in the text, its id."""

    starts: np.ndarray
    ends: np.ndarray
    ids: np.ndarray

    def ids_from(self, start: int, end: int | None = None) -> list[int]:
        """The ids of the tokens that start in text[start:end]."""
        keep = self.starts >= start
        if end is not None:
            keep &= self.starts < end
        return self.ids[keep].tolist()


class Encoder:
    """Tokenizes documents in one worker: ids and, for SFT-style data, the loss mask.

    `special_tokens`: whether `<s>` and `</s>` written in a text are BOS and EOS. Only data
    in the synthesizer's own format means them so; in raw text (HTML strikethrough, NLP code)
    they are characters like any other, or documents would end in the middle."""

    def __init__(self, tokenizer_dir: str, add_bos: bool, max_chars: int,
                 special_tokens: bool) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, no oversubscription
        self.tok = tok.load(tokenizer_dir)
        self.bos = [self.tok.bos_token_id] if add_bos else []
        self.eos = self.tok.eos_token_id
        self.max_chars = max_chars
        self.split_special_tokens = not special_tokens

    def _tokenize(self, text: str | list[str], **kw: Any) -> Any:
        return self.tok(text, add_special_tokens=False,
                        split_special_tokens=self.split_special_tokens, **kw)

    def encode(self, docs: list[src.Doc]) -> list[Encoded]:
        plain = [d for d in docs if d.loss_spans is None and len(d.text) <= self.max_chars]
        batch = self._tokenize([d.text for d in plain])["input_ids"] if plain else []
        encoded = dict(zip((id(d) for d in plain), batch, strict=True))
        out: list[Encoded] = []
        for d in docs:
            if id(d) in encoded:
                out.append((self.bos + encoded[id(d)] + [self.eos], None))
            elif d.loss_spans is None:  # a huge document: bounded memory, piece by piece
                out.append((self.bos + self._encode_long(d.text) + [self.eos], None))
            else:
                out.append(self._with_mask(d))
        return out

    def _encode_long(self, text: str) -> list[int]:
        """Piece by piece, in windows that share SEAM_MARGIN characters either side of each
        cut. A window's tokens are kept up to a seam near the cut: a token boundary where it
        and the next window have the same token before and the same token after. So no
        character is lost or doubled at a cut, and where the tokens near a cut do not depend
        on text far from it (cuts at line breaks or spaces), the ids are those of the whole
        text at once. Where two windows never agree, the cut is dropped and they are one."""
        ends = list(accumulate(map(len, pieces(text, self.max_chars))))
        ids: list[int] = []
        done = start = 0  # text[:done] is in `ids`; the current window starts at `start`
        window = self._tokens(text, 0, ends[0] + SEAM_MARGIN)
        for cut, next_end in pairwise(ends):
            after = max(0, cut - SEAM_MARGIN)
            following = self._tokens(text, after, next_end + SEAM_MARGIN)
            seam = _seam(window, following, done, cut)
            if seam is None:
                window = self._tokens(text, start, next_end + SEAM_MARGIN)
                continue
            ids += window.ids_from(done, seam)
            done, start, window = seam, after, following
        return ids + window.ids_from(done)

    def _tokens(self, text: str, start: int, end: int) -> Window:
        """The tokens of text[start:end], placed in `text`."""
        enc = self._tokenize(text[start:end], return_offsets_mapping=True)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2) + start
        return Window(offsets[:, 0], offsets[:, 1], np.asarray(enc["input_ids"], np.int64))

    def _with_mask(self, d: src.Doc) -> tuple[list[int], np.ndarray]:
        """A token counts when its text starts inside a loss span; BOS never, EOS always."""
        enc = self._tokenize(d.text, return_offsets_mapping=True)
        starts = np.array([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(starts), dtype=np.uint8)
        for a, b in d.loss_spans or ():
            mask[(starts >= a) & (starts < b)] = 1
        full = np.concatenate([np.zeros(len(self.bos), np.uint8), mask, np.ones(1, np.uint8)])
        return self.bos + list(enc["input_ids"]) + [self.eos], full


def _seam(left: Window, right: Window, done: int, cut: int) -> int | None:
    """The token boundary past `done` and nearest `cut` where both windows have the same
    token on either side; None if there is none."""
    lo, hi = right.starts[0], left.ends[-1]  # the text both windows cover

    def sides(w: Window) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
        i, j = np.searchsorted(w.starts, [lo, hi])
        near = list(zip(*(a[max(0, i - 1):j + 1].tolist() for a in w), strict=True))
        return {b[0]: (a, b) for a, b in pairwise(near) if a[0] < b[0]}

    lhs, rhs = sides(left), sides(right)
    shared = [p for p, around in rhs.items() if p > done and lhs.get(p) == around]
    return min(shared, key=lambda p: abs(p - cut), default=None)


_encoder: Encoder | None = None


def _init_worker(tokenizer_dir: str, add_bos: bool, max_chars: int,
                 special_tokens: bool) -> None:
    global _encoder
    _encoder = Encoder(tokenizer_dir, add_bos, max_chars, special_tokens)


def write_group(out: str, k: int, records: list[src.Record], source: str, vocab_size: int,
                fingerprint: str, valid_fraction: float, masked: bool) -> dict[str, Any]:
    """Tokenize and write group `k` of a source; returns (and writes) its accounting."""
    assert _encoder is not None, "worker not initialised"
    root = Path(out)
    docs = [r for r in records if isinstance(r, src.Doc)]
    rejects = [r for r in records if isinstance(r, src.Reject)]
    channels = {"loss_mask": "uint8"} if masked else {}
    writers: dict[str, ShardWriter] = {}
    counts: Counter[str] = Counter()
    for doc, (ids, mask) in zip(docs, _encoder.encode(docs), strict=True):
        split = "valid" if is_valid_doc(doc.id, valid_fraction) else "train"
        if split not in writers:
            writers[split] = ShardWriter(root / split / f"shard_{k:05d}", vocab_size, fingerprint,
                                         source, channels, extra={"group": k})
        extra = {"loss_mask": mask if mask is not None else np.ones(len(ids), np.uint8)} \
            if masked else {}
        writers[split].add(ids, **extra)
        counts[f"{split}_docs"] += 1
        counts[f"{split}_tokens"] += len(ids)
    for w in writers.values():
        w.close()
    (root / "rejects").mkdir(parents=True, exist_ok=True)
    with open(root / "rejects" / f"shard_{k:05d}.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps({"id": r.id, "reason": r.reason}) + "\n")
    part = {"group": k, "records": len(records), **counts,
            "rejected": len(rejects), "reasons": dict(Counter(_reason_kind(r) for r in rejects))}
    (root / "parts").mkdir(parents=True, exist_ok=True)
    tmp = root / "parts" / f"shard_{k:05d}.json.tmp"
    tmp.write_text(json.dumps(part))
    tmp.rename(root / "parts" / f"shard_{k:05d}.json")  # the completion mark
    return part


def _reason_kind(r: src.Reject) -> str:
    return r.reason.split(" (")[0].split(":")[0]


def groups(records: Iterator[src.Record], size: int) -> Iterator[list[src.Record]]:
    while batch := list(islice(records, size)):
        yield batch


def prepare_source(spec: SourceConfig, cfg: PrepareConfig, vocab_size: int, fingerprint: str,
                   add_bos: bool, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """This worker's groups of one source (group k is worker k % count's, of `share`), and
    the source's summary once every group is done, by whichever worker sees that first."""
    index, count = share
    out = Path(cfg.out) / spec.name
    parts_dir = out / "parts"
    done = {int(p.stem.split("_")[1]) for p in parts_dir.glob("shard_*.json")} \
        if parts_dir.is_dir() else set()
    masked = src.masked(spec)
    bar = _progress(cfg, spec.name)
    started, docs_done = time.perf_counter(), 0
    pool = ProcessPoolExecutor(max(1, cfg.workers), initializer=_init_worker,
                               initargs=(cfg.tokenizer, add_bos, cfg.max_chars_per_piece,
                                         src.means_special_tokens(spec)))
    in_flight: deque[Future] = deque()
    total = 0
    try:
        for k, group in enumerate(groups(src.read(spec), cfg.docs_per_shard)):
            total = k + 1
            if k in done or k % count != index:
                continue  # finished by an earlier run, or another worker's: read past it
            in_flight.append(pool.submit(write_group, str(out), k, group, spec.name, vocab_size,
                                         fingerprint, cfg.valid_fraction, masked))
            while len(in_flight) >= 2 * max(1, cfg.workers):
                docs_done += _finish(in_flight.popleft(), bar, started, docs_done)
        while in_flight:
            docs_done += _finish(in_flight.popleft(), bar, started, docs_done)
    finally:
        pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return summarize(out, spec, total)


def _finish(future: Future, bar: Any, started: float, docs_done: int) -> int:
    part = future.result()
    n = part["records"]
    if bar is not None:
        bar.update(n)
        bar.set_postfix(docs_s=f"{(docs_done + n) / (time.perf_counter() - started):.0f}",
                        rejected=part["rejected"])
    return n


def _progress(cfg: PrepareConfig, name: str) -> Any:
    if cfg.progress_bar == "never" or (cfg.progress_bar == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(desc=f"prepare {name}", unit="doc", dynamic_ncols=True)


def summarize(out: Path, spec: SourceConfig, groups: int) -> dict[str, Any]:
    """Add up the groups' accounting: every record read is in train, valid or rejects. Until
    all `groups` are done (other workers' too), only how many are."""
    parts = sorted((out / "parts").glob("shard_*.json"))
    if len(parts) < groups:
        return {"source": asdict(spec), "groups": groups, "groups_done": len(parts),
                "complete": False}
    total: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for p in parts:
        part = json.loads(p.read_text())
        reasons.update(part.pop("reasons"))
        part.pop("group")
        total.update(part)
    summary = {"source": asdict(spec), "groups": len(parts), **dict(total),
               "reject_reasons": dict(reasons), "complete": True}
    written = total["train_docs"] + total["valid_docs"] + total["rejected"]
    if written != total["records"]:
        raise RuntimeError(f"{out}: {total['records']} records read but {written} accounted for")
    publish(out / "summary.json", json.dumps(summary, indent=1))
    return summary


# Source fields that do not change what is read: its name is the folder; streaming and
# allow_partial change how it is read; the path is checked through the files it holds (a
# corpus moved to another disk resumes), or for a remote dataset, checked as it is.
NOT_RECORDED = ("name", "streaming", "allow_partial", "path")


def settings_of(spec: SourceConfig, cfg: PrepareConfig, fingerprint: str,
                add_bos: bool) -> dict[str, Any]:
    """What a source's output depends on: the documents in it, their ids and their groups,
    and whether they start with BOS (false where the tokenizer has none, whatever `add_bos`
    asks)."""
    source = {k: v for k, v in asdict(spec).items() if k not in NOT_RECORDED}
    files = src.contents(spec)
    return {"tokenizer": fingerprint, "add_bos": add_bos,
            "docs_per_shard": cfg.docs_per_shard, "valid_fraction": cfg.valid_fraction,
            "source": source | ({"files": files} if files else {"path": spec.path})}


def check_settings(out: Path, now: dict[str, Any], tokenizer: str) -> None:
    """An output folder holds one run's settings; going on with others would mix two runs
    (as the synthesize stage's `check_settings`). The tokenizer is compared by fingerprint:
    the same one at another path changes nothing."""
    path = out / "settings.json"
    out.mkdir(parents=True, exist_ok=True)
    if publish(path, json.dumps(now | {"tokenizer_path": tokenizer}, indent=1), once=True):
        return
    then = json.loads(path.read_text())
    diff = [f"{k}: {a!r} -> {b!r}" if k != "tokenizer" else
            f"tokenizer: {then.get('tokenizer_path')!r} -> {tokenizer!r} (fingerprint {a} -> {b})"
            for k, a, b in _changes(then, now, list(now))]
    if diff:
        more = f"; and {len(diff) - 5} more" if len(diff) > 5 else ""
        raise ConfigError(f"{out} holds a run with other settings ({'; '.join(diff[:5])}{more}); "
                          "continue it with the same settings or write to a new out")


def _changes(then: dict[str, Any], now: dict[str, Any], keys: list[str],
             prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(name, old, new) of each of `keys` that differs, looking into nested settings."""
    out = []
    for k in keys:
        a, b = then.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, list(dict.fromkeys([*b, *a])), f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def adds_bos(cfg: PrepareConfig, tokenizer: Any) -> bool:
    """Whether documents start with BOS: `add_bos`, where the tokenizer has one. Byte-level
    BPE tokenizers (Qwen's) have none, and their documents are told apart by EOS alone, so
    one without EOS is refused."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer={cfg.tokenizer} has no EOS token, which ends every "
                          "document: name one (eos_token) in its tokenizer_config.json")
    if cfg.add_bos and tokenizer.bos_token_id is None:
        log.info("tokenizer %s has no BOS token: documents start without one (add_bos=true "
                 "has no effect)", cfg.tokenizer)
        return False
    return cfg.add_bos


def prepare(cfg: PrepareConfig) -> dict[str, dict[str, Any]]:
    """Every source of `cfg`, one after another (each in parallel over its groups)."""
    if not cfg.sources:
        raise ConfigError("sources is empty: name at least one, e.g. "
                          "+sources.web.path=/data/web.jsonl")
    if not 0 <= cfg.valid_fraction < 1:
        raise ConfigError(f"valid_fraction={cfg.valid_fraction} must be in [0, 1)")
    if not Path(cfg.tokenizer).is_dir():
        raise ConfigError(f"tokenizer={cfg.tokenizer!r} does not exist")
    specs = []
    for name, spec in cfg.sources.items():
        spec.name = name
        src.check(spec)  # every source must be readable before any work starts
        specs.append(spec)
    tokenizer = tok.load(cfg.tokenizer)
    add_bos = adds_bos(cfg, tokenizer)
    fingerprint = tok.fingerprint(cfg.tokenizer)
    for spec in specs:  # all before any work, as the sources are checked
        check_settings(Path(cfg.out) / spec.name, settings_of(spec, cfg, fingerprint, add_bos),
                       cfg.tokenizer)
    share = worker_share(cfg.worker_index, cfg.num_workers)
    summaries = {}
    for spec in specs:
        summaries[spec.name] = s = prepare_source(spec, cfg, len(tokenizer), fingerprint,
                                                  add_bos, share)
        if not s["complete"]:
            log.info("%s: worker %d of %d has done its groups; %d of %d groups are done, and "
                     "the last worker to finish writes summary.json", spec.name, share[0],
                     share[1], s["groups_done"], s["groups"])
            continue
        log.info("%s: %d records -> %d train docs (%s tokens), %d valid docs, %d rejected %s",
                 spec.name, s.get("records", 0), s.get("train_docs", 0),
                 f"{s.get('train_tokens', 0):,}", s.get("valid_docs", 0), s.get("rejected", 0),
                 s["reject_reasons"] or "")
    return summaries
