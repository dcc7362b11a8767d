"""`data.decompose`: Dataset Decomposition's limits and length curriculum (`ipt.decompose`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipt.config.base import ConfigError

if TYPE_CHECKING:
    from ipt.config.data import DataConfig
    from ipt.config.run import PretrainConfig
    from ipt.config.slm import ScoreConfig

CURRICULA = ("natural", "uniform", "grow_linear", "grow_p2")  # `ipt.decompose`


@dataclass
class DecomposeConfig:
    """Dataset Decomposition (`data.packing=decompose`, `ipt.decompose`): every sequence
    is one piece of one document, of a power of two from min_len to max_len tokens; each
    step draws one length, and a curriculum orders the lengths (docs/data.md)."""

    min_len: int = 64  # shorter document tails are dropped (counted and logged)
    max_len: int | None = None  # null: data.seq_len
    curriculum: str = "grow_p2"  # natural | uniform | grow_linear | grow_p2
    cycles: int = 1  # the curriculum repeats this many times per epoch


def max_len(data: DataConfig | ScoreConfig) -> int:
    """The longest piece of Dataset Decomposition: data.decompose.max_len, or seq_len."""
    return data.decompose.max_len or data.seq_len


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def check_decompose(cfg: PretrainConfig) -> None:
    """`data.packing=decompose`: lengths, micro-batches that hold whole pieces, no offline
    soft labels (they are stored per packed sequence)."""
    d, t = cfg.data.decompose, cfg.train
    longest = max_len(cfg.data)
    if not (_power_of_two(d.min_len) and _power_of_two(longest)) or d.min_len > longest:
        raise ConfigError(f"data.decompose.min_len={d.min_len} and max_len={longest} must be "
                          "powers of two, min_len <= max_len")
    if d.curriculum not in CURRICULA or d.cycles < 1:
        raise ConfigError(f"data.decompose.curriculum={d.curriculum!r} must be one of "
                          f"{CURRICULA}, and cycles={d.cycles} >= 1")
    if t.micro_batch_size * cfg.data.seq_len % longest:
        raise ConfigError(
            f"a micro-batch holds train.micro_batch_size x data.seq_len = "
            f"{t.micro_batch_size * cfg.data.seq_len} tokens, which is not a whole number of "
            f"data.decompose.max_len={longest} pieces; make it a multiple of {longest}")
    if longest > cfg.model.max_seq_len and cfg.model.init_from is None:
        raise ConfigError(f"data.decompose.max_len={longest} exceeds model.max_seq_len="
                          f"{cfg.model.max_seq_len}")
    if cfg.teacher.soft_labels:
        raise ConfigError(
            "teacher.soft_labels=true reads soft labels stored per packed sequence, and "
            "data.packing=decompose trains on pieces of documents instead; distil from the "
            "teacher online (teacher.soft_labels=false) or pack with bestfit")
