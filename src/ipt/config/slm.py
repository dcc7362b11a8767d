"""SALT's groups: `teacher` (distillation), `data.select` (data selection) and the scoring
stage's schema (`ipt.slm`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from ipt.config.base import ConfigError
from ipt.config.decompose import DecomposeConfig

# The statistics of the scoring stage, in the column order of its files (`ipt.slm.score`).
SCORE_COLUMNS = ("median_topk_loss", "mean_loss", "frac_topk")


@dataclass
class SelectConfig:
    """SLM-scored selection for the early phase (`ipt.slm.select`); off while fraction is null."""

    fraction: float | None = None  # share of each source's sequences to draw from
    mode: str = "top"  # top: the highest scores; sample: scores as logits, no replacement
    temperature: float = 1.0  # sample
    column: str = "median_topk_loss"  # median_topk_loss | mean_loss | frac_topk
    steps: int | None = None  # optimizer steps drawn from the selection; null: teacher.kd_steps


@dataclass
class TeacherConfig:
    """A small LM teaching the student through soft labels early in training (SALT)."""

    path: str | None = None  # a transformers model folder; null: no teacher
    weight: float = 0.5  # w in (1 - w) * CE + w * KD
    temperature: float = 1.0
    kd_steps: int = 0  # KD for the first kd_steps optimizer steps
    switch: str = "hard"  # hard | linear (w decays to 0 over decay_steps after kd_steps)
    decay_steps: int = 0
    chunk_size: int = 1024  # target positions per vocabulary-projection chunk
    # Offline: read the teacher's top-K log-probabilities stored beside each source's shards
    # by data_pipeline/score.py soft_labels=K, instead of running it (path may then be null;
    # if set, it must be the model the labels were made with).
    soft_labels: bool = False

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.soft_labels


@dataclass
class ScoreConfig:
    """`data_pipeline/score.py`: a small LM scores the packed sequences of prepared sources."""

    # The SLM: a transformers model folder with the shards' tokenizer. (Not `model`: that
    # name is the model config group on the command line.)
    slm: str = MISSING
    tokenizer: str = MISSING  # the tokenizer the shards were prepared with
    sources: dict[str, str] = field(default_factory=dict)  # name -> prepared source folder
    # The packing of the run that will use the scores (the scores are per packed sequence,
    # or per piece with packing=decompose and its decompose.min_len and max_len).
    seq_len: int = 256
    packing: str = "bestfit"
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    doc_masking: bool = True
    top_k: int = 10
    scores: bool = True  # the per-sequence statistics data selection uses
    # Also store the SLM's top-K log-probabilities per token, for offline distillation
    # (teacher.soft_labels=true): K entries of 4 bytes (6 above 65,536 tokens) per token.
    soft_labels: int = 0
    batch_size: int = 8
    block_size: int = 512  # sequences per resumable unit of work
    progress_bar: str = "auto"


def check_teacher(k: TeacherConfig) -> None:
    """An enabled teacher's schedule and chunking."""
    if k.switch not in ("hard", "linear"):
        raise ConfigError(f"teacher.switch={k.switch!r}; expected hard or linear")
    if not 0 < k.weight <= 1 or k.temperature <= 0 or k.kd_steps < 1 or k.chunk_size < 1:
        raise ConfigError("teacher: weight must be in (0, 1], temperature > 0, "
                          "kd_steps >= 1 and chunk_size >= 1")


def check_select(sel: SelectConfig, teacher: TeacherConfig) -> None:
    """Data selection, when on (`data.select.fraction` set)."""
    if sel.fraction is None:
        return
    if not 0 < sel.fraction <= 1:
        raise ConfigError(f"data.select.fraction={sel.fraction} must be in (0, 1]; "
                          "null turns selection off")
    if sel.mode not in ("top", "sample") or sel.column not in SCORE_COLUMNS:
        raise ConfigError(f"data.select: mode must be top or sample (got {sel.mode!r}), "
                          f"column one of {SCORE_COLUMNS} (got {sel.column!r})")
    if sel.steps is None and not teacher.enabled:
        raise ConfigError("data.select needs data.select.steps, or a teacher whose "
                          "teacher.kd_steps it follows")
