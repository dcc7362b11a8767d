"""SLM-scored data selection (SALT_DS), built into the global sample order.

For the first `steps` optimizer steps (by default the KD phase) the trainer draws only from
the selected sequences of each source: the top `fraction` by score (hard but learnable), or
`fraction` of them sampled without replacement with the scores as logits. The mixture
weights and the repetition rule hold within the selection. After that, the stream is the
ordinary mixture order. Both are pure functions of (seed, scores, fingerprints), so the
loader's single counter still resumes exactly, on any number of ranks. Under Dataset
Decomposition the same choice is made among each source's scored pieces, and the first
steps follow a decomposed order of the selected pieces (`ipt.data.decompose.EarlyPhase`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ipt.config import ConfigError, SelectConfig
from ipt.data.loader import MixtureOrder, PackedShards
from ipt.slm.score import COLUMNS, scores_path


class Scored(Protocol):
    """A source's training sequences (packed, or Dataset Decomposition's pieces)."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def score_options(self) -> str: ...  # the options of data_pipeline/score.py that score them

    def __len__(self) -> int: ...


def load_scores(name: str, source_dir: Path, data: Scored, column: str) -> np.ndarray:
    path = scores_path(source_dir, data)
    if not path.exists():
        raise ConfigError(
            f"data.select: source {name} has no scores for its packing ({path.name}); run "
            f"data_pipeline/score.py slm=<small LM> +sources.{name}={source_dir} "
            f"{data.score_options}")
    scores = np.load(path)
    if scores.shape != (len(data), len(COLUMNS)):
        raise ConfigError(f"data.select: {path} holds {scores.shape[0]} scores for "
                          f"{len(data)} sequences; the shards changed since scoring")
    return scores[:, COLUMNS.index(column)]


def choose(scores: np.ndarray, cfg: SelectConfig, rng: np.random.Generator) -> np.ndarray:
    """Indices of the selected sequences, ascending."""
    n = max(1, round((cfg.fraction or 1.0) * len(scores)))
    s = np.nan_to_num(scores.astype(np.float64), nan=-np.inf)  # no learnable token: last
    if cfg.mode == "top":
        picked = np.argsort(-s, kind="stable")[:n]
    else:  # Gumbel top-n: sampling without replacement, probabilities softmax(s / T)
        finite = np.where(np.isfinite(s), s / cfg.temperature, -1e30)
        picked = np.argsort(-(finite + rng.gumbel(size=len(s))), kind="stable")[:n]
    return np.sort(picked)


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


def selections(key: int, parts: Sequence[Scored], dirs: Sequence[Path],
               names: Sequence[str], cfg: SelectConfig) -> list[np.ndarray]:
    """Each source's selected sequences (indices within the source); `key` seeds sampling."""
    rng = np.random.Generator(np.random.PCG64([key, 7]))
    return [choose(load_scores(n, d, p, cfg.column), cfg, rng)
            for n, d, p in zip(names, dirs, parts, strict=True)]


def digest(selected: Sequence[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(s.tobytes() for s in selected)).hexdigest()[:16]


def selected_order(full: MixtureOrder, parts: Sequence[PackedShards],
                   dirs: Sequence[Path], names: Sequence[str], weights: Sequence[float],
                   cfg: SelectConfig, seed: int, until: int,
                   max_repeat: float) -> SelectedOrder:
    selected = selections(full.key, parts, dirs, names, cfg)
    return SelectedOrder(full, selected, weights, seed, until, max_repeat, names)
