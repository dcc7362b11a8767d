"""Attention with document masking: every kernel ipt can select, and how `auto` picks one.

A packed micro-batch holds several documents per row. A token may attend to earlier tokens of
its own document only, whatever the micro-batch size. The loader describes the documents of
a micro-batch once, on the host, as flash-attention does: `cu_seqlens` (int32, the start of
every document in the flattened [batch x seq] positions, then the total) and `max_seqlen`
(the longest document). A row start always starts a document, so nothing crosses rows, and
padding is a document of its own. Each kernel gets what it needs from those, built once per
micro-batch on the device (`Documents.inputs`) and handed to every layer through the model's
keyword arguments:

| kernel      | what it runs                                   | precision  | backward |
|-------------|------------------------------------------------|------------|----------|
| `flash_attn`| `flash_attn_varlen_func` of the flash-attn package | bf16, fp16 | CUDA  |
| `varlen`    | `torch.nn.attention.varlen.varlen_attn` (CUDA builds of torch, no package) | bf16, fp16 | CUDA |
| `flex`      | `flex_attention` with a block-causal document mask (compiled on CUDA) | any | CUDA |
| `sdpa`      | `scaled_dot_product_attention` with a block-diagonal causal mask | any | CPU, CUDA |

The kernels register with `transformers`' attention interface under `ipt_<kernel>`. Such a
name has no mask function there, so `transformers` builds no mask of its own (and does not
guess documents from position ids, which it does only for one row at a time); RoPE still
reads the restarting `position_ids`. A call without document inputs falls back to SDPA: a
bare `model(input_ids, position_ids)` gets the block-diagonal mask of its position ids, and
decoding with a KV cache gets causal attention aligned to the bottom right.

`auto` picks the fastest kernel that is correct on the machine for the configured
precision: on a GPU in bf16, flash_attn, then varlen, then flex; on a GPU in fp32, flex; on
the CPU, sdpa. `bench/gpu.py` times them against each other.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ipt.config import ConfigError

log = logging.getLogger(__name__)

KERNELS = ("flash_attn", "varlen", "flex", "sdpa")
PREFIX = "ipt_"
HALF = (torch.bfloat16, torch.float16)


def documents(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of a host micro-batch's restarting position ids [batch, seq]:
    a document starts wherever the position does not follow the one before, and at every
    row start."""
    pos = position_ids.numpy().reshape(position_ids.shape[0], -1)
    starts = np.ones(pos.shape, dtype=bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = np.flatnonzero(starts.reshape(-1))
    cu = np.append(first, pos.size).astype(np.int32)
    return torch.from_numpy(cu), int(np.diff(cu).max())


@dataclass
class Documents:
    """A micro-batch's documents on the device, and the inputs a kernel builds from them."""

    cu_seqlens: torch.Tensor  # int32 [documents + 1], on the device
    max_seqlen: int
    batch: int
    seq: int

    def doc_ids(self) -> torch.Tensor:
        """[batch, seq]: the document each position belongs to."""
        flat = torch.arange(self.batch * self.seq, device=self.cu_seqlens.device)
        return torch.searchsorted(self.cu_seqlens[1:].long(), flat, right=True).view(
            self.batch, self.seq)

    def inputs(self, kernel: str) -> dict[str, Any]:
        """The keyword arguments the model hands each attention layer for `kernel`."""
        if kernel in ("flash_attn", "varlen"):
            # Shaped for a compiled layer to compile once: the number of documents varies
            # from micro-batch to micro-batch, so `cu_seqlens` is marked dynamic; the kernel
            # gets the row length as its maximum, a constant (an upper bound: the query
            # blocks past a document's end exit at once).
            if self.cu_seqlens.shape[0] > 2:  # dynamo specialises sizes 0 and 1 anyway
                torch._dynamo.mark_dynamic(self.cu_seqlens, 0)
            return {"ipt_cu_seqlens": self.cu_seqlens, "ipt_max_seqlen": self.seq}
        doc = self.doc_ids()
        if kernel == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            def same_doc_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
                return (doc[b, q] == doc[b, kv]) & (q >= kv)

            block = create_block_mask(same_doc_causal, self.batch, None, self.seq, self.seq,
                                      device=doc.device)
            return {"ipt_block_mask": block}
        causal = torch.ones(self.seq, self.seq, dtype=torch.bool, device=doc.device).tril_()
        mask = (doc[:, :, None] == doc[:, None, :]) & causal
        return {"ipt_mask": mask.unsqueeze(1)}


def model_inputs(batch: dict[str, Any], kernel: str | None) -> dict[str, Any]:
    """Position ids and the kernel's document inputs, for a model's forward. The loader's
    batches carry their documents (`cu_seqlens`, `max_seqlen`); for others they are read
    off the position ids."""
    out: dict[str, Any] = {}
    pos = batch.get("position_ids")
    if pos is not None:
        out["position_ids"] = pos
    if kernel is None or (pos is None and "cu_seqlens" not in batch):
        return out
    if "cu_seqlens" in batch:
        cu, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
    else:  # a batch from elsewhere: its documents from its positions (on a GPU, a sync)
        assert pos is not None
        cu, longest = documents(pos.cpu())
        cu = cu.to(pos.device)
    ids = batch["input_ids"]
    out.update(Documents(cu, longest, ids.shape[0], ids.shape[1]).inputs(kernel))
    return out


def kernel_of(model: Any) -> str | None:
    """The ipt kernel a model (or an engine around it) was built with; None for others."""
    config = getattr(getattr(model, "module", model), "config", None)
    name = getattr(config, "_attn_implementation", None) or ""
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


# --- the kernels: transformers' attention interface --------------------------------------
# Each takes query [batch, heads, seq, dim] and key/value [batch, kv_heads, seq, dim], and
# returns the output as [batch, seq, heads, dim] (and no attention weights).


def _causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None and 1 < q_len < kv_len:
        # queries after a KV cache (verifying speculated tokens): causal from the bottom right
        offset = kv_len - q_len
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril_(offset)
    causal = mask is None and q_len == kv_len
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                         scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
          value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
          dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    mask = kwargs.get("ipt_mask")
    if mask is None and isinstance(attention_mask, torch.Tensor):
        mask = attention_mask  # a mask transformers built (a KV cache with padding)
    pos = kwargs.get("position_ids")
    if mask is None and pos is not None and query.shape[2] == key.shape[2] > 1:
        mask = _mask_from_positions(pos, query.shape[0])
    return _causal_sdpa(query, key, value, mask, scaling), None


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


def _flex(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
          **kwargs: Any) -> tuple[torch.Tensor, None]:
    block = kwargs.get("ipt_block_mask")
    if block is None:
        return _sdpa(module, query, key, value, attention_mask, scaling, **kwargs)
    out = _flex_attention(query.device.type)(query, key, value, block_mask=block, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2), None


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
                 kwargs: dict[str, Any], scaling: float | None,
                 flash_attn: bool) -> torch.Tensor:
    b, h, s, d = query.shape
    cu, longest = kwargs["ipt_cu_seqlens"], kwargs["ipt_max_seqlen"]
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * s, value.shape[1], d)
    if flash_attn:
        out = fn(q, k, v, cu, cu, longest, longest, softmax_scale=scaling, causal=True)
    else:
        extra: dict[str, Any] = {"scale": scaling, **_VARLEN.causal}
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

    causal: dict[str, Any]  # the keyword that makes it causal (torch >= 2.11: a window)
    gqa: bool  # whether it takes fewer K/V heads than query heads (`enable_gqa`)


_VARLEN = _VarlenAPI({"is_causal": True}, gqa=False)
# Grouped-query attention without repeating K/V heads, where torch's varlen_attn can (the
# default); bench/gpu.py turns it off to time the repeat beside it.
VARLEN_GQA = True


def _read_varlen_api() -> _VarlenAPI:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return _VarlenAPI(causal, gqa="enable_gqa" in params)


def _varlen_kernel(fn_of: Any, flash_attn: bool) -> Any:
    """The attention function of a variable-length kernel (`fn_of()` imports it lazily);
    without document inputs it falls back to SDPA, which masks the call's position ids."""

    def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if "ipt_cu_seqlens" not in kwargs:
            return _sdpa(module, query, key, value, attention_mask, scaling, **kwargs)
        return _varlen_call(fn_of(), query, key, value, kwargs, scaling, flash_attn), None

    return attend


def _torch_varlen() -> Any:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _flash_attn_varlen() -> Any:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


_varlen = _varlen_kernel(_torch_varlen, flash_attn=False)
_flash_attn = _varlen_kernel(_flash_attn_varlen, flash_attn=True)


_FUNCTIONS = {"flash_attn": _flash_attn, "varlen": _varlen, "flex": _flex, "sdpa": _sdpa}


@cache
def register() -> None:
    """Make the kernels known to `transformers` as `ipt_<kernel>` (once per process)."""
    from transformers import AttentionInterface

    global _VARLEN
    if _has_varlen():
        _VARLEN = _read_varlen_api()
    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(PREFIX + name, fn)


# --- choosing one ----------------------------------------------------------------------------


def _has_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def why_not(kernel: str, device: torch.device, dtype: torch.dtype, training: bool = True) -> str | None:
    """Why `kernel` cannot run here at `dtype` (None: it can)."""
    gpu = device.type == "cuda"
    if kernel not in KERNELS:
        return f"it is not one of {KERNELS} (or auto)"
    if kernel == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    if kernel == "varlen" and not _has_varlen():
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if kernel in ("flash_attn", "varlen"):
        if not gpu:
            return "it runs on CUDA GPUs only"
        if dtype not in HALF:
            return f"it needs bf16 or fp16, and train.precision gives {dtype}"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "it needs a GPU of compute capability 8.0 (Ampere) or newer"
    if kernel == "flex" and not gpu and training:
        return "flex_attention has no backward on the CPU"
    return None


def choose(requested: str, device: torch.device, dtype: torch.dtype,
           training: bool = True) -> str:
    """The kernel to run: `requested`, checked, or for `auto` the fastest that can run."""
    legacy = {"flash_attention_2": "flash_attn", "flex_attention": "flex"}
    if requested in legacy:
        raise ConfigError(f"model.attn_implementation={requested} is a transformers kernel that "
                          "masks documents for one row at a time; use "
                          f"model.attn_implementation={legacy[requested]} (or auto)")
    if requested != "auto":
        why = why_not(requested, device, dtype, training)
        if why is not None:
            raise ConfigError(f"model.attn_implementation={requested} cannot run here: {why}. "
                              f"Use auto, which picks the fastest that can")
        return requested
    candidates = ("flash_attn", "varlen", "flex", "sdpa") if device.type == "cuda" \
        else ("sdpa",)
    return next(k for k in candidates if why_not(k, device, dtype, training) is None)


# --- a self-check, for the tests and bench/gpu.py ---------------------------------------------


def parity_error(kernel: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 grad: bool = True, seed: int = 0) -> float:
    """Largest difference between the logits of documents packed several to a row, in a
    micro-batch of 3 rows, and the same documents run alone, through a small random Llama
    with `kernel`. Rows hold documents of uneven lengths, one spans a whole row, and one row
    ends in padding. With `grad` the packed forward runs with autograd and a backward."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    register()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, use_cache=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=PREFIX + kernel)
    model = model.to(device=device, dtype=dtype).eval()
    seq = 128
    rows = [[50, 7, 71], [128], [1, 90, 20]]  # the last row ends in 17 positions of padding
    docs = [[torch.randint(3, 96, (n,)) for n in row] for row in rows]
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    pos = torch.zeros(len(rows), seq, dtype=torch.long)
    for r, row in enumerate(docs):
        at = 0
        for d in row:
            ids[r, at:at + len(d)], pos[r, at:at + len(d)] = d, torch.arange(len(d))
            at += len(d)
        pos[r, at:] = torch.arange(seq - at)
    cu, longest = documents(pos)
    batch = {"input_ids": ids.to(device), "position_ids": pos.to(device),
             "cu_seqlens": cu.to(device), "max_seqlen": torch.tensor(longest)}
    with torch.set_grad_enabled(grad):
        packed = model(input_ids=batch["input_ids"], **model_inputs(batch, kernel)).logits
        if grad:
            packed.float().square().mean().backward()
    worst = 0.0
    with torch.no_grad():
        for r, row in enumerate(docs):
            at = 0
            for d in row:
                alone = model(input_ids=d[None].to(device),
                              position_ids=torch.arange(len(d), device=device)[None]).logits
                diff = (packed[r, at:at + len(d)].detach().float() - alone[0].float()).abs()
                worst = max(worst, float(diff.max()))
                at += len(d)
    return worst
