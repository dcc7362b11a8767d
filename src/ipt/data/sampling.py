"""A run's training data: its sources opened, cut into training sequences, in one global order.

`open_train` opens every source of `data.sources` and hands it to a `Sampling`, which decides
what a training sequence is and in what order they come:

- `Packed` (`data.packing=bestfit|concat`): documents packed into sequences of `seq_len`, in
  the mixture order of `ipt.data.loader`, indexed by sample;
- a technique may bring its own (Dataset Decomposition's pieces, `ipt.decompose`), indexed
  by step.

Either way the loader's state is the samples consumed, and the sampling's `settings` are
what a checkpoint records so that a resume with other settings is refused. A technique that
changes the order (SALT's data selection) asks the sampling for an order `restricted` to the
sequences it chose, for the run's first steps.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Dataset

from ipt.config import ConfigError, PretrainConfig
from ipt.data.loader import Concat, MixtureOrder, PackedShards, Prefetcher, train_loader
from ipt.data.shards import ShardSet

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """The training sources, their sequences and the order a run reads them in."""

    names: list[str]
    dirs: list[Path]  # each source's folder
    weights: list[float]
    parts: list[Any]  # each source's training sequences (a Dataset each)
    fingerprint: str  # of the sources' sequences and weights
    valid: dict[str, PackedShards]  # held-out sequences, by source
    order: Any = None  # the global order: `key`, and what the sampling's loader reads
    dataset: Dataset | None = None  # the parts concatenated, or wrapped (`channels_until`)
    # Samples of steps before this one get the dataset's extra per-sample channels (offline
    # soft labels): the dataset then takes (index, wanted) items. None: no extra channels.
    # A step, not a sample: after a rollback the step goes back while the data moves on.
    channels_until: int | None = None


class Sampling(Protocol):
    """What a training sequence is, and the order sequences come in."""

    variable_length: bool  # whether a step's sequence length varies (the trainer logs it)

    def settings(self) -> dict[str, Any]:
        """What the order depends on besides the data; the checkpoint records it."""
        ...

    def part(self, shards: ShardSet) -> Any:
        """One source's training sequences."""
        ...

    def describe(self, name: str, part: Any, weight: float) -> str: ...

    def order(self, data: TrainData) -> Any:
        """The global order over all sources."""
        ...

    def restricted(self, full: Any, data: TrainData, chosen: list[np.ndarray],
                   steps: int) -> Any:
        """An order whose first `steps` steps draw from `chosen` (each source's indices),
        and that goes on as `full` after them."""
        ...

    def batches(self, data: TrainData, consumed: int, micro_batches: int, rank: int,
                world_size: int, pin_memory: bool, step: int | None = None) -> Prefetcher:
        """This rank's micro-batches from global sample `consumed` onwards, the first of
        them for step `step` (`consumed` / the global batch unless a rollback took the step
        back while the data moved on)."""
        ...


def digest(selected: Sequence[np.ndarray]) -> str:
    """A short fingerprint of each source's chosen indices."""
    return hashlib.sha256(b"".join(s.tobytes() for s in selected)).hexdigest()[:16]


class SelectedOrder:
    """The first `until` samples from the selected sequences, the rest the full mixture."""

    def __init__(self, full: MixtureOrder, selected: Sequence[np.ndarray],
                 weights: Sequence[float], seed: int, until: int, max_repeat: float,
                 names: Sequence[str]) -> None:
        self.full, self.until = full, until
        self.early = MixtureOrder([len(s) for s in selected], weights, seed,
                                  f"{full.key:x}:{digest(selected)}:{until}", max_repeat, names)
        self.back = np.concatenate([s + start for s, start in
                                    zip(selected, full.starts, strict=True)])
        self.key = self.early.key  # the data fingerprint a checkpoint records

    def __getitem__(self, k: int) -> int:
        return int(self.back[self.early[k]]) if k < self.until else self.full[k]


class Packed:
    """Documents packed into sequences of `data.seq_len` (`data.packing=bestfit|concat`), in
    the mixture order, indexed by sample."""

    variable_length = False

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg

    def settings(self) -> dict[str, Any]:
        return {"packing": self.cfg.data.packing}

    def part(self, shards: ShardSet) -> PackedShards:
        return packed(shards, self.cfg)

    def describe(self, name: str, part: PackedShards, weight: float) -> str:
        return f"source {name}: {len(part)} sequences ({100 * part.fill:.1f}% filled), " \
               f"weight {weight}"

    def order(self, data: TrainData) -> MixtureOrder:
        d = self.cfg.data
        return MixtureOrder([len(p) for p in data.parts], data.weights, d.seed,
                            data.fingerprint, d.max_repeat, data.names)

    def restricted(self, full: MixtureOrder, data: TrainData, chosen: list[np.ndarray],
                   steps: int) -> SelectedOrder:
        d = self.cfg.data
        return SelectedOrder(full, chosen, data.weights, d.seed,
                             steps * self.cfg.train.global_batch_size, d.max_repeat, data.names)

    def batches(self, data: TrainData, consumed: int, micro_batches: int, rank: int,
                world_size: int, pin_memory: bool, step: int | None = None) -> Prefetcher:
        t = self.cfg.train
        assert data.dataset is not None
        soft_until = None
        if data.channels_until is not None:  # the samples of the steps still before it
            step = consumed // t.global_batch_size if step is None else step
            soft_until = consumed + max(0, data.channels_until - step) * t.global_batch_size
        return train_loader(data.dataset, data.order, consumed, t.global_batch_size,
                            t.micro_batch_size, rank, world_size, self.cfg.data.num_workers,
                            pin_memory=pin_memory, soft_until=soft_until)


def packed(shards: ShardSet, cfg: PretrainConfig) -> PackedShards:
    """Shards in packed sequences of `data.seq_len` (validation always: best-fit when the run
    trains on something else, one fixed measure whatever the sampling)."""
    d = cfg.data
    packing = d.packing if d.packing in ("bestfit", "concat") else "bestfit"
    return PackedShards(shards, d.seq_len, packing, d.doc_masking, d.index_dir)


def open_shards(key: str, path: Path, tokenizer_fp: str, cfg: PretrainConfig) -> ShardSet:
    shards = ShardSet(path)
    if shards.tokenizer_fingerprint != tokenizer_fp:
        raise ConfigError(f"{key}={path} was tokenized with tokenizer "
                          f"{shards.tokenizer_fingerprint}, but tokenizer={cfg.tokenizer} is "
                          f"{tokenizer_fp}; re-run the prepare stage or point at the right one")
    return shards


def open_train(cfg: PretrainConfig, tokenizer_fp: str, sampling: Sampling) -> TrainData:
    """Every training source in `sampling`'s sequences and order, and each source's
    validation set; the order is the full one (techniques may change it after)."""
    names, dirs, parts, valid = [], [], [], {}
    for name, source in cfg.data.sources.items():
        key = f"data.sources.{name}.path"
        names.append(name)
        dirs.append(Path(source.path))
        parts.append(sampling.part(open_shards(key, Path(source.path) / "train", tokenizer_fp,
                                               cfg)))
        held_out = Path(source.path) / "valid"
        if held_out.is_dir() and any(held_out.glob("*.json")):
            valid[name] = packed(open_shards(key, held_out, tokenizer_fp, cfg), cfg)
    weights = [cfg.data.sources[n].weight for n in names]
    fingerprint = hashlib.sha256(repr([(n, p.fingerprint, w) for n, p, w in
                                       zip(names, parts, weights, strict=True)]).encode())
    data = TrainData(names, dirs, weights, parts, fingerprint.hexdigest()[:16], valid)
    data.order = sampling.order(data)
    data.dataset = Concat(parts)
    for n, p, w in zip(names, parts, weights, strict=True):
        log.info("%s", sampling.describe(n, p, w))
    return data
