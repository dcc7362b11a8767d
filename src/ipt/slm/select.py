"""SLM-scored data selection (SALT_DS), built into the global sample order.

For the first `steps` optimizer steps (by default the KD phase) the trainer draws only from
the selected sequences of each source: the top `fraction` by score (hard but learnable), or
`fraction` of them sampled without replacement with the scores as logits. The mixture
weights and the repetition rule hold within the selection. After that, the stream is the
ordinary order. The run's sampling makes the restricted order
(`ipt.data.sampling.Sampling.restricted`): packed sequences by sample, Dataset
Decomposition's pieces by step. Both are pure functions of (seed, scores, fingerprints), so
the loader's single counter still resumes exactly, on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ipt.config import ConfigError, SelectConfig
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


def selections(key: int, parts: Sequence[Scored], dirs: Sequence[Path],
               names: Sequence[str], cfg: SelectConfig) -> list[np.ndarray]:
    """Each source's selected sequences (indices within the source); `key` seeds sampling."""
    rng = np.random.Generator(np.random.PCG64([key, 7]))
    return [choose(load_scores(n, d, p, cfg.column), cfg, rng)
            for n, d, p in zip(names, dirs, parts, strict=True)]
