"""Llama-family causal LMs from `transformers`: built from a config or loaded for continual
pre-training, with the attention kernel chosen by what the machine has; and `FusedLM`, the
module the training engine wraps, whose forward is the loss."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from ipt import attention
from ipt.config import ConfigError, ModelConfig


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


def build_model(cfg: ModelConfig, vocab_size: int, bos_id: int = 1, eos_id: int = 2,
                kernel: str = "sdpa") -> PreTrainedModel:
    """Random init from `cfg` (seeded by the caller), or `from_pretrained(cfg.init_from)`,
    with ipt's attention `kernel` (see `ipt.attention`; `choose` picks it)."""
    attention.register()
    attn = attention.PREFIX + kernel
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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM, then any MTP heads' blocks, in order."""
    inner = getattr(model, "model", model)
    layers = list(getattr(inner, "layers", []))
    for head in getattr(model, "mtp_heads", []):
        layers.append(getattr(head, "block", head))
    return layers


def checkpoint_layers(model: torch.nn.Module, mode: str, every: int = 2) -> int:
    """Activation checkpointing (`train.activation_checkpointing`): `full` recomputes every
    decoder layer (and MTP head) in the backward, `selective` every `every`-th layer from the
    first; returns how many. Non-reentrant `torch.utils.checkpoint`, through transformers'
    own switch on each layer, so ZeRO-3's parameter gathering runs again in the recompute."""
    if mode == "none":
        return 0
    import functools

    from torch.utils.checkpoint import checkpoint

    chosen = 0
    for i, layer in enumerate(decoder_layers(model)):
        on = mode == "full" or i % every == 0
        if not hasattr(layer, "gradient_checkpointing"):
            raise ConfigError(f"train.activation_checkpointing={mode}: {type(layer).__name__} "
                              "has no gradient checkpointing switch")
        setattr(layer, "gradient_checkpointing", on)  # noqa: B010 - a plain attribute
        if on:
            setattr(layer, "_gradient_checkpointing_func",  # noqa: B010
                    functools.partial(checkpoint, use_reentrant=False))
            chosen += 1
    return chosen


def compile_layers(model: torch.nn.Module) -> int:
    """Regional `torch.compile` (`train.compile`): each decoder layer's (and MTP head's)
    forward, not the module call, so module hooks (ZeRO-3's gathering, the MTP heads' capture)
    stay outside the compiled graph. The layers share one compiled graph."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return len(layers)


class FusedLM(torch.nn.Module):
    """The module the training engine wraps: `model` and `lm_head` (the causal LM's own
    modules, so their state-dict keys stay the causal LM's). Its forward is the fused
    unembedding and loss of its heads' hidden states (`ipt.losses.fused`): here head 1 alone;
    a technique that adds heads extends `hidden` (`ipt.mtp.heads.MTPModel`)."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.model, self.lm_head = lm.model, lm.lm_head
        self.config = lm.config
        object.__setattr__(self, "lm", lm)  # the whole causal LM, not registered twice
        # The fused loss reads the unembedding directly rather than calling its module: under
        # ZeRO-3 this keeps it gathered for the whole forward (elsewhere it is a no-op).
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(self, self.lm_head.weight)

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               past: Any = None, head_past: Any = None, heads: bool = True,
               documents: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """The normed hidden states of every head, [batch, seq, hidden] each, head 1 first
        (head 1's alone when not `heads`). `past` / `head_past`: KV caches of the model and
        of any extra heads, when decoding; `documents`: position ids and the attention
        kernel's document inputs (`ipt.attention.model_inputs`), which replace
        `position_ids`."""
        inputs = dict(documents) if documents is not None else {"position_ids": position_ids}
        out = self.model(input_ids=input_ids, use_cache=past is not None,
                         **cache_kwargs(self.model, past), **inputs)
        return [out.last_hidden_state]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, scales: list[Any],
                documents: dict[str, Any] | None = None, kd: Any = None,
                memory_efficient: bool = True, chunk_size: int = 1024,
                heads: bool = True) -> Any:
        """The weighted loss of every head (`ipt.losses.fused`), or of head 1 alone when not
        `heads`: run inside the engine's forward, so ZeRO-3 gathers what it uses and sees one
        forward and one backward. `documents`: see `hidden`."""
        from ipt.losses.fused import heads_loss

        hs = self.hidden(input_ids, heads=heads, documents=documents)
        return heads_loss(hs, self.lm_head, targets, scales, kd, memory_efficient, chunk_size)
