"""Dataset Decomposition as a technique of a run: its pieces replace packed sequences, and
its steps, of one length each, follow a length curriculum."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from ipt.config import PretrainConfig, max_len
from ipt.data.loader import Prefetcher, load
from ipt.data.pieces import DecomposedShards
from ipt.data.sampling import TrainData, digest
from ipt.data.shards import ShardSet
from ipt.decompose.order import DecomposedOrder, EarlyPhase, PieceBatches, piece_ids
from ipt.technique import Setup, Technique

log = logging.getLogger(__name__)


class Pieces:
    """The `Sampling` of `data.packing=decompose`: each source's pieces, and an order of
    steps, indexed by step (`ipt.decompose.order`)."""

    variable_length = True

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        d = cfg.data
        self.make_order = functools.partial(
            DecomposedOrder, tokens_per_step=cfg.train.global_batch_size * d.seq_len,
            curriculum=d.decompose.curriculum, cycles=d.decompose.cycles, seed=d.seed,
            max_repeat=d.max_repeat)

    def settings(self) -> dict[str, Any]:
        d = self.cfg.data
        return {"packing": d.packing, "data.decompose.min_len": d.decompose.min_len,
                "data.decompose.max_len": max_len(d), "data.decompose.curriculum":
                d.decompose.curriculum, "data.decompose.cycles": d.decompose.cycles,
                "tokens per step": self.cfg.train.global_batch_size * d.seq_len,
                "data.seed": d.seed}

    def part(self, shards: ShardSet) -> DecomposedShards:
        d = self.cfg.data
        return DecomposedShards(shards, d.decompose.min_len, max_len(d), d.index_dir)

    def describe(self, name: str, part: DecomposedShards, weight: float) -> str:
        return (f"source {name}: {len(part)} pieces of "
                f"{'/'.join(map(str, part.lengths[::-1]))} tokens, "
                f"{100 * part.dropped_share:.1f}% of its tokens in none (tails under "
                f"data.decompose.min_len), weight {weight}")

    def order(self, data: TrainData) -> DecomposedOrder:
        d = self.cfg.data.decompose
        full = self.make_order(piece_ids(data.parts), weights=data.weights, names=data.names,
                               fingerprint=data.fingerprint)
        log.info("Dataset Decomposition: %d steps per epoch, curriculum %s x %d; %.1f%% of the "
                 "pieces' tokens are left out of each epoch (whole steps only: a bucket's last "
                 "partial step, and the remainders of its cycles)", full.epoch_steps,
                 d.curriculum, d.cycles, 100 * full.left_out)
        return full

    def restricted(self, full: DecomposedOrder, data: TrainData, chosen: list[np.ndarray],
                   steps: int) -> EarlyPhase:
        early = self.make_order(piece_ids(data.parts, chosen), weights=data.weights,
                                names=data.names,
                                fingerprint=f"{full.key:x}:{digest(chosen)}:{steps}")
        return EarlyPhase(early, full, steps)

    def batches(self, data: TrainData, consumed: int, micro_batches: int, rank: int,
                world_size: int, pin_memory: bool, step: int | None = None) -> Prefetcher:
        """A step's pieces, by steps consumed."""
        assert data.dataset is not None and data.channels_until is None
        steps_done = consumed // self.cfg.train.global_batch_size
        return load(data.dataset, PieceBatches(data.order, steps_done, micro_batches, rank,
                                               world_size), self.cfg.data.num_workers,
                    pin_memory)


class Decomposition(Technique):
    """`data.packing=decompose`, configured by `data.decompose`."""

    name = "decompose"

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: PretrainConfig) -> Decomposition | None:
        return cls(cfg) if cfg.data.packing == "decompose" else None

    def sampling(self, setup: Setup) -> Pieces:
        return Pieces(self.cfg)
