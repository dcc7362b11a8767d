"""The registry of techniques a pre-training run composes (`ipt.technique`).

Adding a technique: write its package with one `Technique` subclass, give it a config group
(`ipt.config`), and add one line here. docs/design-notes.md walks through it.
"""

from __future__ import annotations

from ipt.config import PretrainConfig
from ipt.decompose.technique import Decomposition
from ipt.mtp.technique import MultiToken
from ipt.slm.technique import SmallLM
from ipt.technique import Technique

# In the order their hooks run.
TECHNIQUES: dict[str, type[Technique]] = {
    "decompose": Decomposition,
    "slm": SmallLM,
    "mtp": MultiToken,
}


def configured(cfg: PretrainConfig) -> list[Technique]:
    """The techniques `cfg` turns on, in registry order."""
    return [t for kind in TECHNIQUES.values() if (t := kind.from_config(cfg)) is not None]


def state_prefixes() -> tuple[str, ...]:
    """The checkpoint-weight prefixes that belong to techniques, not to the causal LM."""
    return tuple(kind.state_prefix for kind in TECHNIQUES.values() if kind.state_prefix)
