"""Indexes of a shard set, built once and memory-mapped by every rank.

What a source's training sequences are (its packing, or Dataset Decomposition's pieces) is a
pure function of its shards and a few settings. Computing it costs time and memory that grow
with the corpus, so it is computed once per (shards' fingerprint, settings), written as flat
arrays to a folder beside the shards, and memory-mapped read-only: every rank of every node
shares one copy in the page cache, and a start costs the same whatever the corpus' size.

An index folder is `{root}/{name}-{fingerprint}/`, holding one raw file per array and
`index.json` (format, the shards it was built from, each array's dtype and length). It is
built in a folder of its own (`.tmp-...-{host}-{pid}`) and published by one rename, so a
reader sees a whole index or none. Builders on one host take a lock (`flock`) and the others
wait for the result; builders that a lock does not reach (another host, a file system without
locks) each build their own and the first rename wins, the rest are discarded. An index that
does not match its shards or its own metadata is never used: it is set aside and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ipt.data.shards import ShardError, ShardSet, map_array

log = logging.getLogger(__name__)

FORMAT = "ipt-index/1"


class IndexWriter:
    """Appends to the arrays of an index being built, one file each."""

    def __init__(self, directory: Path, dtypes: dict[str, str]) -> None:
        self.directory, self.dtypes = directory, {k: np.dtype(v) for k, v in dtypes.items()}
        self.counts = dict.fromkeys(dtypes, 0)
        self._files = {k: open(directory / f"{k}.bin", "wb") for k in dtypes}  # noqa: SIM115

    def append(self, **arrays: np.ndarray) -> None:
        for name, values in arrays.items():
            a = np.ascontiguousarray(values, dtype=self.dtypes[name])
            self._files[name].write(a.tobytes())
            self.counts[name] += len(a)

    def close(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


class Index:
    """A finished index: its metadata and its arrays, memory-mapped read-only."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory, self.meta = directory, meta
        self.arrays = {name: map_array(directory / f"{name}.bin", np.dtype(dt),
                                       meta["counts"][name])
                       for name, dt in meta["dtypes"].items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def shards_meta(shards: ShardSet) -> list[list[Any]]:
    """What an index records of the shards it was built from, to refuse any others."""
    return [[s.stem.name, s.meta["num_docs"], s.meta["num_tokens"]] for s in shards.shards]


def check(directory: Path, shards: ShardSet, name: str) -> tuple[dict[str, Any], str | None]:
    """The metadata of the index in `directory`, and why it cannot be used for `shards`
    (None if it can)."""
    try:
        meta = json.loads((directory / "index.json").read_text())
    except FileNotFoundError:
        return {}, "it has no index.json"
    except (OSError, ValueError) as e:
        return {}, f"its index.json is unreadable ({e})"
    expected = {"format": FORMAT, "name": name, "fingerprint": shards.fingerprint,
                "shards": shards_meta(shards)}
    for key, value in expected.items():
        if meta.get(key) != value:
            return meta, f"its {key} is {meta.get(key)!r}, the shards' is {value!r}"
    for array, dt in meta.get("dtypes", {}).items():
        path = directory / f"{array}.bin"
        size = meta["counts"][array] * np.dtype(dt).itemsize
        if not path.is_file() or path.stat().st_size != size:
            have = path.stat().st_size if path.is_file() else "no"
            return meta, f"{path.name} has {have} bytes, index.json says {size}"
    return meta, None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        # on a file system without locks builders race instead, and the first rename wins
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def cached(shards: ShardSet, name: str, dtypes: dict[str, str],
           build: Callable[[IndexWriter], dict[str, Any]], root: Path | None = None) -> Index:
    """The index `name` of `shards`: opened if a good one exists, else built with `build`
    (which appends every array to the writer and returns extra metadata) and published.

    `root` is where indexes are kept: by default `index/` inside the shards' folder."""
    root = Path(root) if root is not None else shards.directory / "index"
    final = root / f"{name}-{shards.fingerprint}"
    meta, why = check(final, shards, name)
    if why is None:
        return Index(final, meta)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = root / f".{final.name}.lock"
        lock.touch()
    except OSError as e:
        raise ShardError(f"cannot write the index of {shards.directory} to {root} ({e}); "
                         "make it writable, or set data.index_dir to a writable folder") from e
    with _locked(lock):
        meta, why = check(final, shards, name)
        if why is None:  # another process built it while this one waited
            return Index(final, meta)
        tag = f"{socket.gethostname()}-{os.getpid()}"
        if final.exists():
            log.warning("index %s is not used: %s; rebuilding it", final, why)
            aside = root / f".bad-{final.name}-{tag}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
        tmp = root / f".tmp-{final.name}-{tag}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        start = time.perf_counter()
        try:
            writer = IndexWriter(tmp, dtypes)
            extra = build(writer)
            writer.close()
            meta = {"format": FORMAT, "name": name, "fingerprint": shards.fingerprint,
                    "shards": shards_meta(shards), "dtypes": dtypes, "counts": writer.counts,
                    **extra}
            (tmp / "index.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, final)
            except OSError:  # a builder outside the lock published first: use that one
                if check(final, shards, name)[1] is not None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("index %s: built in %.1f s", final, time.perf_counter() - start)
    meta, why = check(final, shards, name)
    if why is not None:
        raise ShardError(f"index {final} was just built but cannot be used: {why}")
    return Index(final, meta)
