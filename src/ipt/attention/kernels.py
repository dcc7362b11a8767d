"""The attention kernels ipt registers with transformers' attention interface, and what each
implements of what a layer may ask (`IMPLEMENTS`). `ipt.attention` says how they keep
documents apart and how one is chosen.

Each takes query [batch, heads, seq, dim] and key/value [batch, kv_heads, seq, dim], and
returns the output as [batch, seq, heads, dim] (and no attention weights)."""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

KERNELS = ("flash_attn", "varlen", "flex", "sdpa", "eager")
PREFIX = "ipt_"

# What a layer may ask of attention, by the name messages give it.
WINDOW = "sliding-window attention"
SOFTCAP = "an attention soft-cap"
SINKS = "attention sinks"
DROPOUT = "attention dropout"
IMPLEMENTS: dict[str, frozenset[str]] = {
    "flash_attn": frozenset({WINDOW, SOFTCAP, DROPOUT}),
    "varlen": frozenset({WINDOW}),
    "flex": frozenset({WINDOW, SOFTCAP}),
    "sdpa": frozenset({WINDOW, DROPOUT}),
    "eager": frozenset({WINDOW, SOFTCAP, SINKS, DROPOUT}),
}


def registered_name(kernel: str) -> str:
    """The name `kernel` is registered under with transformers' attention interface."""
    return PREFIX + ("sdp" if kernel == "sdpa" else kernel)


def band(q_len: int, kv_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len]: which keys lie within `window` of each query (itself and the window - 1
    before it), the queries aligned to the last keys."""
    offset = kv_len - q_len
    q = torch.arange(q_len, device=device)[:, None] + offset
    return q - torch.arange(kv_len, device=device)[None] < window


def _refuse(kernel: str, kwargs: dict[str, Any], dropout: float) -> None:
    """A backstop behind `choose`: raise where a layer asks `kernel` for what it does not
    implement, rather than drop it."""
    asked = {WINDOW: kwargs.get("sliding_window") is not None,
             SOFTCAP: kwargs.get("softcap") is not None,
             SINKS: kwargs.get("s_aux") is not None, DROPOUT: dropout > 0}
    missing = [name for name, used in asked.items() if used and name not in IMPLEMENTS[kernel]]
    if missing:
        raise RuntimeError(f"a layer asks the {kernel} attention kernel for "
                           f"{' and '.join(missing)}, which it does not implement; "
                           "model.attn_implementation=auto picks one that does")


def _layer_mask(masks: dict[int | None, Any], window: int | None) -> Any:
    if window not in masks:
        raise RuntimeError(f"a layer asks for a sliding window of {window} tokens, and its "
                           f"document masks were built for {sorted(w for w in masks if w)}: "
                           "the model's config does not say what its layers use")
    return masks[window]


def _dense_mask(query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The layer's mask for the SDPA and eager kernels: the micro-batch's (`ipt_masks`), a
    mask transformers built (a KV cache with padding), or one from the call's position ids
    or its shape, with the layer's window. None: plain causal attention."""
    window = kwargs.get("sliding_window")
    if "ipt_masks" in kwargs:
        return _layer_mask(kwargs["ipt_masks"], window)
    if isinstance(attention_mask, torch.Tensor):
        return attention_mask
    q_len, kv_len = query.shape[2], key.shape[2]
    pos = kwargs.get("position_ids")
    if pos is not None and q_len == kv_len > 1:
        mask = _mask_from_positions(pos, query.shape[0])
    elif 1 < q_len < kv_len or window is not None:
        # queries after a KV cache (verifying speculated tokens): causal from the bottom right
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril_(
            kv_len - q_len)
    else:
        return None
    return mask if window is None else mask & band(q_len, kv_len, window, query.device)


def _mask_from_positions(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The block-diagonal causal mask of restarting position ids, on the device (no sync):
    for a call that brought no document inputs, such as a bare `model(input_ids,
    position_ids)`. Slower than the inputs `model_inputs` builds once per micro-batch."""
    pos = position_ids.expand(batch, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    doc = starts.cumsum(-1)
    seq = pos.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=pos.device).tril_()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
          value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
          dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    _refuse("sdpa", kwargs, dropout)
    mask = _dense_mask(query, key, attention_mask, kwargs)
    causal = mask is None and query.shape[2] == key.shape[2]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                         dropout_p=dropout, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2), None


def _eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
           dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The scores written out, in the order transformers' eager forward of Gemma 2 and
    GPT-OSS computes them: scale, soft-cap, mask, sinks beside the keys, softmax in fp32,
    dropout. Every feature, at the memory of every score."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(2, 3) * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = _dense_mask(query, key, attention_mask, kwargs)
    if mask is None:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril_(
            kv_len - q_len)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, q_len, 1)
        scores = torch.cat([scores, sink.to(scores.dtype)], dim=-1)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), None


def _flex(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
          **kwargs: Any) -> tuple[torch.Tensor, None]:
    masks = kwargs.get("ipt_block_masks")
    if masks is None:
        return _sdpa_or_eager(module, query, key, value, attention_mask, scaling, dropout,
                              **kwargs)
    _refuse("flex", kwargs, dropout)
    block = _layer_mask(masks, kwargs.get("sliding_window"))
    softcap = kwargs.get("softcap")
    out = _flex_attention(query.device.type)(
        query, key, value, block_mask=block, scale=scaling,
        score_mod=None if softcap is None else _softcap_mod(softcap),
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2), None


def _softcap_mod(cap: float) -> Callable[..., torch.Tensor]:
    def softcap(score: torch.Tensor, b: Any, h: Any, q: Any, kv: Any) -> torch.Tensor:
        return torch.tanh(score / cap) * cap

    return softcap


def _sdpa_or_eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A call without document inputs (a bare forward, decoding): SDPA where it implements
    what the layer asks, else eager."""
    plain = kwargs.get("softcap") is None and kwargs.get("s_aux") is None
    attend = _sdpa if plain else _eager
    return attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def compiled_flex(backend: Any = "inductor") -> Any:
    """flex_attention compiled to serve every shape a run brings: Dataset Decomposition's
    buckets and validation change the batch and sequence sizes from step to step. Dynamo
    compiles the first shape as it is and, at the first change, once more with the sizes that
    changed symbolic (its automatic dynamic shapes); compiled for fixed sizes, each bucket
    would recompile, until past the recompile limit it ran uncompiled, materialising every
    score."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None, backend=backend)


@cache
def _flex_attention(device_type: str) -> Any:
    """flex_attention, compiled on a GPU (uncompiled it materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return compiled_flex()
    # elsewhere only forwards run (a CPU teacher, the tests): slow is fine, say nothing
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


def _varlen_call(fn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kwargs: dict[str, Any], scaling: float | None, dropout: float,
                 flash_attn: bool) -> torch.Tensor:
    b, h, s, d = query.shape
    cu, longest = kwargs["ipt_cu_seqlens"], kwargs["ipt_max_seqlen"]
    window = kwargs.get("sliding_window")
    left = -1 if window is None else window - 1  # the keys before the query it may see
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * s, value.shape[1], d)
    if flash_attn:
        _refuse("flash_attn", kwargs, dropout)
        out = fn(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling,
                 causal=True, window_size=(left, 0), softcap=kwargs.get("softcap") or 0.0)
    else:
        _refuse("varlen", kwargs, dropout)
        if window is not None and not _VARLEN.window:
            raise RuntimeError(f"torch {torch.__version__}'s varlen_attn takes no window: "
                               "model.attn_implementation=auto picks a kernel that does")
        extra: dict[str, Any] = {"scale": scaling}
        extra |= {"window_size": (left, 0)} if _VARLEN.window else {"is_causal": True}
        if k.shape[1] != h:
            if _VARLEN.gqa and VARLEN_GQA:
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(h // k.shape[1], dim=1)
                v = v.repeat_interleave(h // v.shape[1], dim=1)
        out = fn(q, k, v, cu, cu, longest, longest, **extra)
    return out.reshape(b, s, h, d)


@dataclass(frozen=True)
class _VarlenAPI:
    """What the installed torch's `varlen_attn` takes, read once by `register()`: outside
    any compiled region, since `inspect` cannot be traced."""

    window: bool  # a `window_size` (torch >= 2.11), which also makes it causal
    gqa: bool  # whether it takes fewer K/V heads than query heads (`enable_gqa`)


_VARLEN = _VarlenAPI(window=False, gqa=False)
# Grouped-query attention without repeating K/V heads, where torch's varlen_attn can (the
# default); bench/gpu.py turns it off to time the repeat beside it.
VARLEN_GQA = True


def read_varlen_api() -> _VarlenAPI:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return _VarlenAPI(window="window_size" in params, gqa="enable_gqa" in params)


def _varlen_kernel(fn_of: Any, flash_attn: bool) -> Any:
    """The attention function of a variable-length kernel (`fn_of()` imports it lazily);
    without document inputs it falls back to SDPA (or eager), which masks the call's
    position ids."""

    def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if "ipt_cu_seqlens" not in kwargs:
            return _sdpa_or_eager(module, query, key, value, attention_mask, scaling, dropout,
                                  **kwargs)
        return _varlen_call(fn_of(), query, key, value, kwargs, scaling, dropout,
                            flash_attn), None

    return attend


def _torch_varlen() -> Any:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _flash_attn_varlen() -> Any:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


_varlen = _varlen_kernel(_torch_varlen, flash_attn=False)
_flash_attn = _varlen_kernel(_flash_attn_varlen, flash_attn=True)


_FUNCTIONS = {"flash_attn": _flash_attn, "varlen": _varlen, "flex": _flex, "sdpa": _sdpa,
              "eager": _eager}


@cache
def register() -> None:
    """Make the kernels known to `transformers` (`registered_name`; once per process)."""
    from transformers import AttentionInterface

    global _VARLEN
    if has_varlen():
        _VARLEN = read_varlen_api()
    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(registered_name(name), fn)


def has_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


