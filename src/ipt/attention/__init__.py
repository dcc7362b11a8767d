"""Attention with document masking, honouring what each layer of the model asks for: every
kernel ipt can select, and how `auto` picks one.

A packed micro-batch holds several documents per row. A token may attend to earlier tokens of
its own document only, whatever the micro-batch size. The loader describes the documents of
a micro-batch once, on the host, as flash-attention does: `cu_seqlens` (int32, the start of
every document in the flattened [batch x seq] positions, then the total) and `max_seqlen`
(the longest document). A row start always starts a document, so nothing crosses rows, and
padding is a document of its own. Each kernel gets what it needs from those, built once per
micro-batch on the device (`Documents.inputs`) and handed to every layer through the model's
keyword arguments.

A layer also hands the kernel what its family asks of attention, as transformers passes it
to every attention function: a sliding window (`sliding_window`: the token and the
`window - 1` before it), a soft-cap on the scores (`softcap`, Gemma 2), sinks (`s_aux`,
GPT-OSS), dropout, and the family's scaling. A kernel honours each or refuses it: `needs`
reads what a model's layers use off its config before anything is built, `choose` picks
only a kernel that implements all of it, and a kernel that meets a feature at run time that
it cannot honour raises rather than drop it.

| kernel      | what it runs                                   | precision  | backward | implements |
|-------------|------------------------------------------------|------------|----------|------------|
| `flash_attn`| `flash_attn_varlen_func` of the flash-attn package | bf16, fp16 | CUDA | window, soft-cap, dropout |
| `varlen`    | `torch.nn.attention.varlen.varlen_attn` (CUDA builds of torch, no package) | bf16, fp16 | CUDA | window |
| `flex`      | `flex_attention`, a block mask per window and a score_mod (compiled on CUDA) | any | CUDA | window, soft-cap |
| `sdpa`      | `scaled_dot_product_attention` with an explicit mask per window | any | CPU, CUDA | window, dropout |
| `eager`     | the scores written out, as transformers' eager forward computes them | any | CPU, CUDA | all |

The kernels register with `transformers`' attention interface under `ipt_<kernel>` (`sdpa`
as `ipt_sdp`: transformers takes any name containing "sdpa" for its own SDPA, and refuses it
for a family such as Gemma 2). Such a name has no mask function there, so `transformers`
builds no mask of its own (and does not guess documents from position ids, which it does
only for one row at a time); RoPE still reads the restarting `position_ids`. A call without
document inputs masks its position ids: a bare `model(input_ids, position_ids)` gets the
block-diagonal mask of its position ids, and decoding with a KV cache gets causal attention
aligned to the bottom right, each with the layer's window.

`auto` picks the fastest kernel that is correct on the machine for the configured precision
and implements what the model's layers ask for: on a GPU in bf16, flash_attn, then varlen,
then flex; on a GPU in fp32, flex; on the CPU, sdpa; eager where nothing faster implements
it all. `bench/gpu.py` times them against each other.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ipt.attention.kernels import (
    DROPOUT,
    IMPLEMENTS,
    KERNELS,
    SINKS,
    SOFTCAP,
    WINDOW,
    band,
    compiled_flex,
    has_varlen,
    read_varlen_api,
    register,
    registered_name,
)
from ipt.config import ConfigError

__all__ = ["DROPOUT", "IMPLEMENTS", "KERNELS", "SINKS", "SOFTCAP", "WINDOW", "Documents",
           "Needs", "choose", "compiled_flex", "documents", "kernel_of", "model_inputs",
           "needs", "needs_of", "parity_error", "register", "registered_name", "why_not"]

log = logging.getLogger(__name__)
HALF = (torch.bfloat16, torch.float16)
# The layer types of `config.layer_types` whose attention ipt computes; any other (chunked
# attention, linear attention, state-space layers) is refused by name.
LAYER_TYPES = ("full_attention", "sliding_attention")
# Families whose attention has learned sinks (`s_aux`), which no config field announces.
SINK_FAMILIES = ("gpt_oss",)


_KERNEL_OF = {registered_name(k): k for k in KERNELS}


@dataclass(frozen=True)
class Needs:
    """What a model's layers ask of attention, read off its config (`needs`)."""

    family: str = "llama"  # the config's model_type, for messages
    windows: tuple[int, ...] = ()  # the sliding windows its layers use
    softcap: float | None = None
    sinks: bool = False
    dropout: float = 0.0
    unsupported: tuple[str, ...] = ()  # layer types no kernel here computes

    def features(self) -> frozenset[str]:
        found = {WINDOW: bool(self.windows), SOFTCAP: self.softcap is not None,
                 SINKS: self.sinks, DROPOUT: self.dropout > 0}
        return frozenset(name for name, used in found.items() if used)


def needs(config: Any) -> Needs:
    """What the layers of a model of `config` (a transformers config) ask of attention: its
    sliding window where any layer uses one (every layer where the family has no
    `layer_types`, as Mistral and Phi-3), the soft-cap, sinks and dropout."""
    window = getattr(config, "sliding_window", None)
    types = list(getattr(config, "layer_types", None) or [])
    if window is not None and types and "sliding_attention" not in types:
        window = None  # configured, but no layer uses it (Qwen2 without use_sliding_window)
    return Needs(family=getattr(config, "model_type", "") or type(config).__name__,
                 windows=(int(window),) if window else (),
                 softcap=getattr(config, "attn_logit_softcapping", None),
                 sinks=getattr(config, "model_type", None) in SINK_FAMILIES,
                 dropout=float(getattr(config, "attention_dropout", None)  # GPT-2: attn_pdrop
                               or getattr(config, "attn_pdrop", None) or 0.0),
                 unsupported=tuple(sorted({t for t in types if t not in LAYER_TYPES})))


def needs_of(model: Any) -> Needs:
    """`needs` of a model (or an engine around it)."""
    return needs(getattr(getattr(model, "module", model), "config", None))


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

    def inputs(self, kernel: str, windows: tuple[int, ...] = ()) -> dict[str, Any]:
        """The keyword arguments the model hands each attention layer for `kernel`: a mask
        for full attention (key None) and one for each of `windows`, where the kernel takes
        masks."""
        if kernel in ("flash_attn", "varlen"):
            # Shaped for a compiled layer to compile once: the number of documents varies
            # from micro-batch to micro-batch, so `cu_seqlens` is marked dynamic; the kernel
            # gets the row length as its maximum, a constant (an upper bound: the query
            # blocks past a document's end exit at once). The window is the layer's own.
            if self.cu_seqlens.shape[0] > 2:  # dynamo specialises sizes 0 and 1 anyway
                torch._dynamo.mark_dynamic(self.cu_seqlens, 0)
            return {"ipt_cu_seqlens": self.cu_seqlens, "ipt_max_seqlen": self.seq}
        doc = self.doc_ids()
        if kernel == "flex":
            return {"ipt_block_masks": {w: self._block_mask(doc, w) for w in (None, *windows)}}
        causal = torch.ones(self.seq, self.seq, dtype=torch.bool, device=doc.device).tril_()
        mask = ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)
        masks: dict[int | None, torch.Tensor] = {None: mask}
        for w in windows:
            masks[w] = mask & band(self.seq, self.seq, w, doc.device)
        return {"ipt_masks": masks}

    def _block_mask(self, doc: torch.Tensor, window: int | None) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_doc_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (doc[b, q] == doc[b, kv]) & (q >= kv)

        def same_doc_window(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (doc[b, q] == doc[b, kv]) & (q >= kv) & (q - kv < window)

        rule = same_doc_causal if window is None else same_doc_window
        return create_block_mask(rule, self.batch, None, self.seq, self.seq, device=doc.device)


def model_inputs(batch: dict[str, Any], model: Any) -> dict[str, Any]:
    """Position ids and the document inputs of `model`'s kernel (None: a model without an ipt
    kernel, which gets position ids only), for a model's forward. The loader's batches carry
    their documents (`cu_seqlens`, `max_seqlen`); for others they are read off the position
    ids."""
    out: dict[str, Any] = {}
    pos = batch.get("position_ids")
    if pos is not None:
        out["position_ids"] = pos
    kernel = kernel_of(model) if model is not None else None
    if kernel is None or (pos is None and "cu_seqlens" not in batch):
        return out
    if "cu_seqlens" in batch:
        cu, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
    else:  # a batch from elsewhere: its documents from its positions (on a GPU, a sync)
        assert pos is not None
        cu, longest = documents(pos.cpu())
        cu = cu.to(pos.device)
    ids = batch["input_ids"]
    docs = Documents(cu, longest, ids.shape[0], ids.shape[1])
    out.update(docs.inputs(kernel, needs_of(model).windows))
    return out


def kernel_of(model: Any) -> str | None:
    """The ipt kernel a model (or an engine around it) was built with; None for others."""
    config = getattr(getattr(model, "module", model), "config", None)
    return _KERNEL_OF.get(getattr(config, "_attn_implementation", None) or "")


def why_not(kernel: str, device: torch.device, dtype: torch.dtype, training: bool = True,
            model: Needs = Needs()) -> str | None:
    """Why `kernel` cannot run here at `dtype`, or cannot compute what `model`'s layers ask
    for (None: it can)."""
    gpu = device.type == "cuda"
    if kernel not in KERNELS:
        return f"it is not one of {KERNELS} (or auto)"
    missing = sorted(model.features() - IMPLEMENTS[kernel])
    if kernel == "varlen" and model.windows and has_varlen() and not read_varlen_api().window:
        missing.append(f"{WINDOW} (in torch {torch.__version__})")
    if missing:
        return f"it does not implement {' or '.join(missing)}, which {model.family}'s layers use"
    if kernel == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    if kernel == "varlen" and not has_varlen():
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


def choose(requested: str, device: torch.device, dtype: torch.dtype, training: bool = True,
           model: Needs = Needs()) -> str:
    """The kernel to run: `requested`, checked, or for `auto` the fastest that can run and
    implements what `model`'s layers ask for."""
    if model.unsupported:
        raise ConfigError(f"{model.family} has layers of type {', '.join(model.unsupported)}, "
                          f"whose attention ipt does not compute (it computes "
                          f"{' and '.join(LAYER_TYPES)}); it cannot be trained here")
    legacy = {"flash_attention_2": "flash_attn", "flex_attention": "flex"}
    if requested in legacy:
        raise ConfigError(f"model.attn_implementation={requested} is a transformers kernel that "
                          "masks documents for one row at a time; use "
                          f"model.attn_implementation={legacy[requested]} (or auto)")
    if requested != "auto":
        why = why_not(requested, device, dtype, training, model)
        if why is not None:
            raise ConfigError(f"model.attn_implementation={requested} cannot run here: {why}. "
                              f"Use auto, which picks the fastest that can")
        return requested
    candidates = ("flash_attn", "varlen", "flex", "sdpa", "eager") if device.type == "cuda" \
        else ("sdpa", "eager")
    return next(k for k in candidates if why_not(k, device, dtype, training, model) is None)


# --- a self-check, for the tests and bench/gpu.py ---------------------------------------------


def parity_error(kernel: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 grad: bool = True, seed: int = 0, window: int | None = None) -> float:
    """Largest difference between the logits of documents packed several to a row, in a
    micro-batch of 3 rows, and the same documents run alone, through a small random Llama
    with `kernel` (a Mistral with a sliding `window`). Rows hold documents of uneven lengths,
    one spans a whole row, and one row ends in padding. With `grad` the packed forward runs
    with autograd and a backward."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    register()
    torch.manual_seed(seed)
    shape: dict[str, Any] = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 use_cache=False)
    config = LlamaConfig(**shape) if window is None else MistralConfig(sliding_window=window,
                                                                       **shape)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=registered_name(kernel))
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
        packed = model(input_ids=batch["input_ids"], **model_inputs(batch, model)).logits
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

