"""`model`: the causal LM's shape, or the folder it continues from (`ipt.model`)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """A Llama's shape (see `configs/model/`), or the folder of any causal LM to continue."""

    name: str = MISSING
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # A Hugging Face folder to continue pre-training from (weights and architecture: any
    # causal LM transformers loads, docs/configuration.md); null means random
    # initialisation of a Llama from the fields above.
    init_from: str | None = None
    # auto | flash_attn | varlen | flex | sdpa: the kernel that masks documents (ipt.attention);
    # auto picks the fastest that runs here at train.precision, and logs it.
    attn_implementation: str = "auto"
