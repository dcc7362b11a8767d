"""The training loader: a deterministic global order of sequences, read by a single counter.

The order of samples is a pure function of (seed, epoch, dataset fingerprint). The loader's
whole state is `consumed`, the number of samples all ranks together have used. Global batch
`b` is samples `[b*G, (b+1)*G)` of that order; rank `r` of `R` reads the `r`-th contiguous
slice of it, cut into micro-batches. Resuming (after a crash, or on another number of ranks
with the same global batch G) therefore continues at the next unseen sample: nothing is
repeated, nothing skipped, and there is no per-rank or per-worker state to save.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ipt.data.shards import ShardError, ShardSet


class ChunkedSequences(Dataset):
    """Fixed windows of `seq_len + 1` tokens cut from each shard's token stream.

    Window `i` of a shard starts at token `i * seq_len`, so consecutive windows share one token
    (the last label of one is the first input of the next) and no token is lost.
    """

    def __init__(self, shards: ShardSet, seq_len: int) -> None:
        self.shards = shards
        self.seq_len = seq_len
        counts = [max(0, (s.meta["num_tokens"] - 1) // seq_len) for s in shards.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise ShardError(f"{shards.directory}: {shards.num_tokens} tokens do not fill one "
                             f"sequence of {seq_len + 1}; lower data.seq_len or add data")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        start = (index - int(self.offsets[k])) * self.seq_len
        window = np.asarray(self.shards.shards[k].tokens[start:start + self.seq_len + 1],
                            dtype=np.int64)
        ids = torch.from_numpy(window)
        return {"input_ids": ids[:-1], "labels": ids[1:]}

    @property
    def fingerprint(self) -> str:
        return f"{self.shards.fingerprint}-L{self.seq_len}"


class GlobalOrder:
    """Sample `k` of the infinite stream is `perm(seed, epoch)[k % n]`, epoch = `k // n`."""

    def __init__(self, num_samples: int, seed: int, fingerprint: str) -> None:
        self.n = num_samples
        digest = hashlib.sha256(f"{seed}:{fingerprint}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "little")
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.key, epoch]))
            self._perm, self._epoch = rng.permutation(self.n), epoch
        return self._perm

    def __getitem__(self, k: int) -> int:
        return int(self.permutation(k // self.n)[k % self.n])


class RankBatches:
    """Index lists of this rank's micro-batches, from global sample `consumed` onwards."""

    def __init__(self, order: GlobalOrder, consumed: int, global_batch: int, micro_batch: int,
                 rank: int, world_size: int) -> None:
        assert global_batch % (micro_batch * world_size) == 0
        self.order, self.consumed = order, consumed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.per_rank = global_batch // world_size
        self.rank = rank

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed
        while True:
            base = start + self.rank * self.per_rank
            for m in range(0, self.per_rank, self.micro_batch):
                yield [self.order[base + m + j] for j in range(self.micro_batch)]
            start += self.global_batch


def train_loader(dataset: ChunkedSequences, seed: int, consumed: int, global_batch: int,
                 micro_batch: int, rank: int, world_size: int, num_workers: int,
                 pin_memory: bool = False) -> DataLoader:
    """An endless DataLoader over this rank's micro-batches, starting after `consumed`."""
    order = GlobalOrder(len(dataset), seed, dataset.fingerprint)
    batches = RankBatches(order, consumed, global_batch, micro_batch, rank, world_size)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


def eval_batches(dataset: ChunkedSequences, micro_batch: int, rank: int, world_size: int,
                 num_batches: int) -> list[list[int]]:
    """A fixed validation subset (the first sequences), split across ranks."""
    total = min(len(dataset), micro_batch * world_size * num_batches)
    mine = list(range(rank, total, world_size))
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]
