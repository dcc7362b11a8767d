"""Llama-family causal LMs from `transformers`: built from a config or loaded for continual
pre-training, with the attention kernel chosen by what the machine has."""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from ipt.config import ConfigError, ModelConfig


def attention_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` (a `transformers.Cache`) to a model or decoder
    layer. transformers 5.24 renamed `past_key_values` to `cache` and, on the inner model and
    its layers, ignores the old name without an error, so the name is read off the signature
    rather than assumed."""
    cls = type(module)
    if cls not in _CACHE_NAMES:
        params = inspect.signature(cls.forward).parameters
        _CACHE_NAMES[cls] = "cache" if "cache" in params else "past_key_values"
    return {_CACHE_NAMES[cls]: cache}


_CACHE_NAMES: dict[type, str] = {}

CACHE_KWARGS = ("cache", "past_key_values")


def llama_config(cfg: ModelConfig, vocab_size: int, bos_id: int, eos_id: int) -> LlamaConfig:
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"model.hidden_size={cfg.hidden_size} must divide by model.num_heads="
                          f"{cfg.num_heads}, which must divide by model.num_kv_heads="
                          f"{cfg.num_kv_heads}")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None, use_cache=False,
    )


def build_model(cfg: ModelConfig, vocab_size: int, bos_id: int = 1,
                eos_id: int = 2) -> PreTrainedModel:
    """Random init from `cfg` (seeded by the caller), or `from_pretrained(cfg.init_from)`."""
    attn = attention_implementation(cfg.attn_implementation)
    if cfg.init_from:
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, attn_implementation=attn,
                                                     dtype=torch.float32)
        if model.config.vocab_size != vocab_size:
            raise ConfigError(f"model.init_from={cfg.init_from} has a vocabulary of "
                              f"{model.config.vocab_size}, the tokenizer has {vocab_size}")
    else:
        config = llama_config(cfg, vocab_size, bos_id, eos_id)
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                                 dtype=torch.float32)
    model.config.use_cache = False
    return model


def _embedding_numel(model: torch.nn.Module) -> int:
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return int(embeddings.weight.numel())


def count_params(model: torch.nn.Module, exclude_embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= _embedding_numel(model)
    return n


def flops_per_token(model: PreTrainedModel, seq_len: int, extra_heads: int = 0,
                    head_params: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention scores (PaLM's estimate);
    each extra MTP head adds its own matmuls (`head_params`; default one decoder layer's) and
    another pass through the unembedding."""
    c = model.config
    n = count_params(model, exclude_embeddings=True)
    if c.tie_word_embeddings:
        n += _embedding_numel(model)  # the unembedding matmul still runs
    if head_params is None:
        head_params = sum(p.numel() for p in model.model.layers[-1].parameters())
    per_head = 6 * (head_params + c.vocab_size * c.hidden_size) + 12 * c.hidden_size * seq_len
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq_len + extra_heads * per_head
