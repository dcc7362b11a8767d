"""The training loader: a deterministic global order of packed sequences, read by one counter.

The training set is the concatenation of every source's packed sequences. An epoch has `T`
slots (as many as there are sequences); each source gets its share of them (its mixture
weight), drawn from its sequences in passes, a fresh permutation each pass (so a source's
sequences repeat, or are subsampled, as its share needs, and never repeat within a pass), and
the epoch's slots are shuffled. Sample `k` of the endless stream is slot `k % T` of epoch
`k // T`. Every permutation involved is a keyed one read element by element
(`ipt.data.permutation`), keyed by (seed, dataset fingerprint, epoch, source, pass): the
order is a pure function of them, costs O(1) memory however large the corpus, and sample `k`
is found in O(1) time, wherever a run resumes.

The loader's whole state is `consumed`, the number of samples all ranks together have used.
Global batch `b` is samples `[b*G, (b+1)*G)`; rank `r` of `R` reads the `r`-th contiguous
slice of it, cut into micro-batches. Resuming, after a crash or on another number of ranks
with the same G, continues at the next unseen sample. Nothing is repeated or skipped, and no
per-rank or per-worker state exists to save.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ipt.attention import documents
from ipt.config import ConfigError
from ipt.data.index import IndexWriter, cached
from ipt.data.packing import PACKINGS, pack, sequence
from ipt.data.permutation import Draws
from ipt.data.shards import ShardError, ShardSet


class PackedShards(Dataset):
    """The packed sequences of one source's shards (see `ipt.data.packing`), from the shard
    set's index (`ipt.data.index`): built once, memory-mapped here."""

    def __init__(self, shards: ShardSet, seq_len: int, packing: str = "bestfit",
                 doc_masking: bool = True, index_dir: str | Path | None = None) -> None:
        if packing not in PACKINGS:
            raise ConfigError(f"packing={packing!r}; expected one of {PACKINGS}")
        self.shards, self.seq_len = shards, seq_len
        self.how, self.doc_masking = packing, doc_masking
        self.index = cached(shards, f"{packing}-L{seq_len}", SEQUENCE_ARRAYS,
                            lambda w: _pack_all(shards, seq_len, packing, w),
                            Path(index_dir) if index_dir is not None else None)
        self.offsets, self.shard = self.index["offsets"], self.index["shard"]
        if len(self) == 0:
            raise ShardError(f"{shards.directory}: no sequences to train on")

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard = self.shards.shards[int(self.shard[index])]
        seg = slice(int(self.offsets[index]), int(self.offsets[index + 1]))
        arrays = sequence(shard.tokens, self.index["base"][seg], self.index["length"][seg],
                          self.index["ends"][seg], self.seq_len, 0, self.doc_masking,
                          shard.channels.get("loss_mask"))
        return {name: torch.from_numpy(a) for name, a in arrays.items()}

    @property
    def fill(self) -> float:
        """Share of positions holding real tokens (the rest is padding)."""
        return self.index.meta["tokens"] / (len(self) * self.seq_len)

    @property
    def fingerprint(self) -> str:
        return f"{self.shards.fingerprint}-L{self.seq_len}-{self.how}-m{int(self.doc_masking)}"

    @property
    def score_options(self) -> str:
        """The options of data_pipeline/score.py that score these sequences."""
        return (f"seq_len={self.seq_len} packing={self.how} "
                f"doc_masking={str(self.doc_masking).lower()}")


# A packing index: sequence i is segments [offsets[i], offsets[i+1]) of shard shard[i];
# segment j is length[j] tokens from flat offset base[j], ends[j] if its document ends there.
SEQUENCE_ARRAYS = {"offsets": "int64", "shard": "int32", "base": "int64", "length": "int32",
                   "ends": "uint8"}


def _pack_all(shards: ShardSet, seq_len: int, how: str, out: IndexWriter) -> dict[str, Any]:
    """Pack every shard of a set into `out`, one shard at a time."""
    segments = tokens = 0
    out.append(offsets=np.zeros(1, dtype=np.int64))
    for k, shard in enumerate(shards.shards):
        ends = np.asarray(shard.doc_ends, dtype=np.int64)
        lens = np.diff(ends, prepend=0)
        p = pack(lens, seq_len, how)
        out.append(offsets=p.offsets[1:] + segments, shard=np.full(len(p), k),
                   base=ends[p.doc] - lens[p.doc] + p.start, length=p.length,
                   ends=p.start + p.length == lens[p.doc])
        segments += len(p.doc)
        tokens += int(p.length.sum())
    return {"seq_len": seq_len, "packing": how, "tokens": tokens}


class Concat(Dataset):
    """Sources one after another: global index = source offset + index within the source."""

    def __init__(self, parts: Sequence[Dataset]) -> None:
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[k][index - int(self.offsets[k])]


def shares(sizes: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Slots per source in an epoch of `sum(sizes)` slots: proportional to the weights, in
    whole numbers that add up exactly (largest remainders)."""
    total = int(sum(sizes))
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


class Order(Protocol):
    """A global sample order: sample k of the endless stream is sequence `order[k]`."""

    key: int  # the fingerprint a checkpoint records, to refuse resuming on other data

    def __getitem__(self, k: int) -> int: ...


class MixtureOrder:
    """The global sample order over the concatenated sources (see the module docstring)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int,
                 fingerprint: str, max_repeat: float = float("inf"),
                 names: Sequence[str] | None = None) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source, and at least one source")
        if any(w <= 0 for w in weights):
            raise ConfigError(f"mixture weights must be > 0, got {list(weights)}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.counts = shares(sizes, weights)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.epoch_len = int(self.counts.sum())
        names = list(names or [str(i) for i in range(len(sizes))])
        for name, n, size in zip(names, self.counts, self.sizes, strict=True):
            if n / size > max_repeat:
                raise ConfigError(
                    f"source {name}: its weight asks for {n} sequences per epoch but it has "
                    f"{size}, a repetition of {n / size:.1f}x > data.max_repeat={max_repeat}; "
                    "lower its weight, add data, or raise data.max_repeat")
        digest = hashlib.sha256(f"{seed}:{fingerprint}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "little")
        self.draws = Draws(self.sizes, self.counts, self.key)

    def __getitem__(self, k: int) -> int:
        return int(self.take(np.array([k]))[0])

    def take(self, ks: np.ndarray) -> np.ndarray:
        """The sequences of samples `ks` (an int array), at once."""
        epoch, slot = np.divmod(np.asarray(ks, dtype=np.int64), self.epoch_len)
        out = np.empty_like(slot)
        for e in np.unique(epoch).tolist():
            at = epoch == e
            source, element = self.draws.take(slot[at], e)
            out[at] = self.starts[source] + element
        return out


class RankBatches:
    """Index lists of this rank's micro-batches, from global sample `consumed` onwards."""

    def __init__(self, order: Order, consumed: int, global_batch: int, micro_batch: int,
                 rank: int, world_size: int, soft_until: int | None = None) -> None:
        assert global_batch % (micro_batch * world_size) == 0
        self.order, self.consumed, self.soft_until = order, consumed, soft_until
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.per_rank = global_batch // world_size
        self.rank = rank

    def __iter__(self) -> Iterator[list[Any]]:
        start = self.consumed
        while True:
            base = start + self.rank * self.per_rank
            for m in range(0, self.per_rank, self.micro_batch):
                ks = range(base + m, base + m + self.micro_batch)
                if self.soft_until is None:
                    yield [self.order[k] for k in ks]
                else:  # (index, whether the sample needs its soft labels)
                    yield [(self.order[k], k < self.soft_until) for k in ks]
            start += self.global_batch


KEYS = ("input_ids", "labels", "position_ids")


def stack(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A micro-batch: the sequences as one [3, batch, seq] tensor (one transfer between
    processes, not three), its documents (`cu_seqlens`, `max_seqlen`: see `ipt.attention`),
    and any further fields (soft labels) stacked as they are."""
    packed = torch.stack([torch.stack([it[k] for it in items]) for k in KEYS])
    cu_seqlens, max_seqlen = documents(packed[KEYS.index("position_ids")])
    out = {"packed": packed, "cu_seqlens": cu_seqlens, "max_seqlen": torch.tensor(max_seqlen)}
    for k in items[0].keys() - set(KEYS):
        out[k] = torch.stack([it[k] for it in items])
    return out


def unstack(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    packed = batch.pop("packed")
    return {**dict(zip(KEYS, packed.unbind(0), strict=True)), **batch}


def to_device(host_batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """A micro-batch on the device; `max_seqlen` stays a host number (kernels take an int)."""
    return {k: int(v) if k == "max_seqlen" else v.to(device, non_blocking=True)
            for k, v in host_batch.items()}


class Prefetcher:
    """Runs an iterator on a background thread, `depth` items ahead.

    Assembling a packed batch is cheap (slices of memory-mapped shards), so a thread in the
    training process keeps ahead of the step with no inter-process transfer; with worker
    processes, it also takes the cost of receiving their batches off the training thread.
    Errors are raised on the training thread at the batch where they happened.
    """

    _END = object()

    def __init__(self, iterable: Iterable, depth: int = 8) -> None:
        self.queue: queue.Queue = queue.Queue(depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(iterable,), daemon=True,
                                       name="ipt-prefetch")
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterable: Iterable) -> None:
        try:
            for item in iterable:
                if not self._put(item):
                    return  # closed: leave the loop, so the loader shuts down in this thread
        except BaseException as e:  # noqa: BLE001 - handed to the consumer to raise
            self._put(e)
        self._put(self._END)

    def close(self) -> None:
        """Stop the thread and wait for it: a loader torn down mid-batch at interpreter exit
        aborts the process."""
        self.stopping.set()
        self.thread.join(timeout=30)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


def train_loader(dataset: Dataset, order: Order, consumed: int, global_batch: int,
                 micro_batch: int, rank: int, world_size: int, num_workers: int = 0,
                 pin_memory: bool = False, soft_until: int | None = None) -> Prefetcher:
    """This rank's micro-batches, endlessly, from global sample `consumed` onwards; `close()`
    it when done.

    `num_workers=0` (the default) assembles batches on a background thread; more workers
    add processes, for datasets whose items are expensive to build. With `soft_until`, the
    dataset takes `(index, wanted)` items and adds soft labels to samples before that one.
    """
    batches = RankBatches(order, consumed, global_batch, micro_batch, rank, world_size,
                          soft_until)
    return load(dataset, batches, num_workers, pin_memory)


def load(dataset: Dataset, batches: Iterable[list[Any]], num_workers: int = 0,
         pin_memory: bool = False) -> Prefetcher:
    """The micro-batches of `batches` (lists of dataset indices), assembled and collated
    ahead of the step (see `train_loader`); `close()` it when done."""
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=stack, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0,
                        prefetch_factor=4 if num_workers > 0 else None)
    return Prefetcher(unstack(b) for b in loader)


def eval_batches(dataset: Dataset, micro_batch: int, rank: int, world_size: int,
                 num_batches: int) -> list[list[int]]:
    """A fixed validation subset (the first sequences), split across ranks.

    Every rank gets the same number of micro-batches, whatever the subset's size: a forward
    under ZeRO-3 is a collective (parameters are gathered), so a rank that ran out early would
    wait in the metrics all-reduce while another waits in a gather. A rank short of sequences
    gets empty lists, which the evaluator runs as fully masked batches that count nothing.
    """
    total = min(len(dataset), micro_batch * world_size * num_batches)  # type: ignore[arg-type]
    mine = list(range(rank, total, world_size))
    batches = math.ceil(math.ceil(total / world_size) / micro_batch)
    return [mine[i * micro_batch:(i + 1) * micro_batch] for i in range(batches)]
