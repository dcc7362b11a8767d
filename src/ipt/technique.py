"""The seam through which a technique changes a pre-training run.

A technique (SALT's small LM, multi-token prediction, Dataset Decomposition) is one object,
built from its config group by `from_config` (None: the run does not use it). `ipt.pretrain`
builds the configured ones (`ipt.techniques.configured`) and calls their hooks at fixed
points of the run, in the registry's order; it names none of them. Every hook defaults to
changing nothing, so a technique writes only the ones it needs:

| hook           | when                                  | for example                      |
|----------------|---------------------------------------|----------------------------------|
| `check`        | before any data or model is read      | the teacher's tokenizer matches  |
| `sampling`     | opening the data                      | Dataset Decomposition's pieces   |
| `data`         | after the data is opened              | data selection, soft labels      |
| `model`        | after the causal LM is built          | extra prediction heads           |
| `model_config` | the checkpoint's architecture record  | how many heads, of which type    |
| `flops`        | counting FLOPs for MFU                | the heads' matmuls               |
| `loss`         | after resuming (the step is known)    | distillation from a teacher      |
| `export`       | writing a Hugging Face folder         | the heads' weights beside it     |

The core this runs on, and what each hook may rely on, is in docs/design-notes.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ipt.config import PretrainConfig
from ipt.data.sampling import Sampling, TrainData
from ipt.engine import Dist
from ipt.losses import Loss
from ipt.model import FusedLM

Flops = Callable[[int], float]
"""Training FLOPs per token of a sequence length."""


@dataclass
class Setup:
    """What a run has settled before its hooks run."""

    cfg: PretrainConfig
    dist: Dist
    kernel: str  # the attention kernel (`ipt.attention.choose`)
    dtype: torch.dtype  # the training precision
    tokenizer_fp: str
    vocab_size: int


class Technique:
    """A technique's changes to a run; see the module docstring for when each hook runs."""

    name = ""  # its registry name (`ipt.techniques.TECHNIQUES`)
    # Checkpoint weights under this prefix are the technique's, not the causal LM's: an
    # export hands them to `export`.
    state_prefix: str | None = None

    @classmethod
    def from_config(cls, cfg: PretrainConfig) -> Technique | None:
        """The technique as `cfg` configures it, or None when the run does not use it."""
        raise NotImplementedError

    def check(self, setup: Setup) -> None:
        """Refuse, with the key named, what cannot run; before any data or model."""

    def sampling(self, setup: Setup) -> Sampling | None:
        """Training sequences of the technique's own kind (at most one technique's)."""
        return None

    def data(self, data: TrainData, sampling: Sampling, setup: Setup) -> TrainData:
        """The training data with its order or per-sample channels changed."""
        return data

    def model(self, lm: Any, setup: Setup) -> FusedLM | None:
        """The module the engine wraps, in place of `FusedLM(lm)` (at most one technique's)."""
        return None

    def model_config(self) -> dict[str, Any]:
        """Fields the checkpoint records beside the causal LM's config; a resume into a model
        whose fields differ is refused."""
        return {}

    def flops(self, flops: Flops, lm: Any) -> Flops:
        return flops

    def loss(self, loss: Loss, step: int, setup: Setup) -> Loss:
        """The loss, wrapped; `step` is the step the run starts (or resumes) at."""
        return loss

    @classmethod
    def export(cls, extra: dict[str, torch.Tensor], hf_config: Any, out: Path,
               run_config: dict[str, Any]) -> None:
        """Write what the technique keeps beside a Hugging Face export: `extra` holds the
        checkpoint's weights under `state_prefix`; `run_config` is the run's config."""
