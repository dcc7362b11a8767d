"""A causal LM with n - 1 extra prediction heads, of one of two types.

`parallel` (Gloeckle et al.): head 1 is the model itself, its last decoder layer, final norm
and unembedding. Heads 2..n are further decoder layers of the model's own block type; they
read what the last layer reads (the output z of layer L - 1) and share the final norm and
the unembedding. Head i predicts token t + i.

`sequential` (DeepSeek-V3's MTP modules): module k (k = 1..n-1) predicts token t + k + 1 from
the previous depth's hidden state h_{k-1} (h_0: the last layer's output) and the embedding of
token t + k: h_k = block_k(W_k [RMSNorm(h_{k-1}); RMSNorm(Emb(x_{t+k}))]), then the shared
final norm and unembedding. The causal chain is kept: depth k sees the true tokens up to
t + k.

Dropping the extra heads leaves the ordinary `transformers` model, so the export is a plain
causal LM with the heads in a file beside it:

    mtp_heads.safetensors   the extra heads' weights (`<k>.<parameter>`, k = 0 for head 2)
    mtp_config.json         how many, of which type and block, for which model shape

The heads see exactly what the last layer sees: a forward hook on it captures its input,
its output and the arguments it got (attention mask, rotary embeddings, positions),
whatever attention kernel or document masking the model uses.

Any causal LM whose decoder is a list of layers ending in one final norm takes heads (a
Llama, a GPT-2, a GPT-NeoX: `ipt.model.layer_stack`, `ipt.model.final_norm`); another is
refused by name.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from ipt.config import HEAD_TYPES
from ipt.model import (
    CACHE_KWARGS,
    FusedLM,
    architecture,
    cache_kwargs,
    experts,
    final_norm,
    layer_stack,
)

HEADS_FILE = "mtp_heads.safetensors"
HEADS_CONFIG = "mtp_config.json"
PREFIX = "mtp_heads."


class HeadsError(ValueError):
    """Heads that do not fit the model, or a model without heads where they are needed."""


def last_layer_and_norm(lm: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    """The decoder layer the heads copy and the final norm they share, or a refusal that
    names the architecture."""
    layers, norm = layer_stack(lm), final_norm(lm)
    if layers is None or norm is None:
        missing = "list of decoder layers" if layers is None else "single final norm"
        raise HeadsError(f"MTP heads copy the last decoder layer and share the final norm; "
                         f"{architecture(lm)} has no {missing} ipt can find, so it trains "
                         "with loss=ntp only")
    return layers[-1], norm


def new_block(lm: PreTrainedModel, k: int) -> nn.Module:
    """A fresh decoder layer of the model's own type, keeping KV cache slot `k`."""
    last, _ = last_layer_and_norm(lm)
    try:
        return type(last)(lm.config, layer_idx=k)
    except TypeError as e:
        raise HeadsError(f"MTP heads copy the last decoder layer, and {architecture(lm)}'s "
                         f"{type(last).__name__} is not built as (config, layer_idx) ({e}); "
                         "it trains with loss=ntp only") from e


def new_norm(lm: PreTrainedModel) -> nn.Module:
    """A norm of the final norm's type and shape, whatever its constructor takes (a copy,
    which the caller initialises afresh: a parameter's copy is not marked as loaded)."""
    return copy.deepcopy(last_layer_and_norm(lm)[1])


class SequentialModule(nn.Module):
    """DeepSeek-V3's MTP module: the projection of [Norm(h_{k-1}); Norm(Emb(x_{t+k}))] to
    the model's width (each norm of the final norm's type), then one decoder layer of the
    model's own type."""

    def __init__(self, lm: PreTrainedModel, k: int) -> None:
        super().__init__()
        width = lm.config.hidden_size
        self.hidden_norm = new_norm(lm)
        self.embed_norm = new_norm(lm)
        self.proj = nn.Linear(2 * width, width, bias=False)
        self.block = new_block(lm, k)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        x = self.proj(torch.cat([self.hidden_norm(h), self.embed_norm(emb)], dim=-1))
        out = self.block(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def new_heads(lm: PreTrainedModel, count: int, head_type: str = "parallel") -> nn.ModuleList:
    """`count` freshly initialised heads (seeded by the caller); head k keeps its own KV
    cache slot k when decoding."""
    if experts(lm.config):  # a head would be an expert layer whose router loss counts nowhere
        raise HeadsError(f"MTP heads are decoder layers of the model's own type, and "
                         f"{architecture(lm)} is a mixture of experts whose router loss they "
                         "would not add; train it with loss=ntp")
    kinds = set(getattr(lm.config, "layer_types", None) or ())
    if len(kinds) > 1:  # a head gets the last layer's mask, so all layers must share one kind
        raise HeadsError(f"MTP heads need one attention type in every layer; "
                         f"{architecture(lm)} mixes {sorted(kinds)}")
    if head_type not in HEAD_TYPES:
        raise HeadsError(f"MTP head type {head_type!r}; known: {HEAD_TYPES}")
    last_layer_and_norm(lm)  # refused here, by name, when the layout has no place for heads
    if head_type == "sequential":
        heads = nn.ModuleList(SequentialModule(lm, k) for k in range(count))
    else:
        heads = nn.ModuleList(new_block(lm, k) for k in range(count))
    heads.apply(lm._init_weights)
    return heads.to(dtype=lm.dtype)


def head_type_of(heads: nn.ModuleList) -> str:
    return "sequential" if len(heads) and isinstance(heads[0], SequentialModule) else "parallel"


class MTPModel(FusedLM):
    """`FusedLM` with `mtp_heads`: its hidden states are head 1's, then each extra head's."""

    _last: nn.Module  # the model's last decoder layer and final norm (not registered twice)
    _norm: nn.Module

    def __init__(self, lm: PreTrainedModel, heads: nn.ModuleList) -> None:
        super().__init__(lm)
        self.mtp_heads = heads
        self.head_type = head_type_of(heads)
        self._seen: tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None = None
        self._capturing = False
        if len(heads):
            last, norm = last_layer_and_norm(lm)
            object.__setattr__(self, "_last", last)
            object.__setattr__(self, "_norm", norm)
            # a layer's positional parameters, to name the arguments a model passes by
            # position (a GPT-2 hands its block the cache and the mask so)
            params = inspect.signature(type(last).forward).parameters.values()
            self._params = [p.name for p in params
                            if p.kind == p.POSITIONAL_OR_KEYWORD][1:] or ["hidden_states"]
            last.register_forward_hook(self._capture, with_kwargs=True)

    @property
    def n(self) -> int:
        return len(self.mtp_heads) + 1

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                 output: Any) -> None:
        if not self._capturing:  # recomputation under activation checkpointing
            return
        named = dict(zip(self._params, args, strict=False)) | kwargs
        z = named.pop(self._params[0])
        out = output[0] if isinstance(output, tuple) else output
        self._seen = (z, out, named)

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               past: Any = None, head_past: Any = None, heads: bool = True,
               documents: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """See `FusedLM.hidden`; the extra heads read what the last layer read (captured by
        its forward hook) and keep their own KV cache, `head_past`."""
        self._capturing = True
        try:
            hs = super().hidden(input_ids, position_ids, past, documents=documents)
        finally:
            self._capturing = False
        if heads and len(self.mtp_heads):
            assert self._seen is not None, "the last layer's hook did not run"
            z, h, kwargs = self._seen
            self._seen = None
            kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
            kwargs.update(cache_kwargs(self._last, head_past))  # a head is such a layer
            if self.head_type == "sequential":
                emb = self.lm.get_input_embeddings()(input_ids)
                for k, module in enumerate(self.mtp_heads, start=1):
                    # Emb(x_{t+k}); past the sequence's end zeros (those positions have no
                    # target at this depth, and causal attention keeps them from the rest)
                    shifted = torch.cat([emb[:, k:], emb.new_zeros(emb[:, :k].shape)], dim=1)
                    h = module(h, shifted, **kwargs)
                    hs.append(self._norm(h))
            else:
                for head in self.mtp_heads:
                    out = head(z, **kwargs)
                    hs.append(self._norm(out[0] if isinstance(out, tuple) else out))
        return hs


def attach(lm: PreTrainedModel, extra: int, init_from: str | None,
           head_type: str = "parallel") -> MTPModel:
    """`lm` with `extra` heads: those saved beside `init_from` when it has them (continual
    pre-training of an MTP model), else new ones."""
    if init_from is not None and has_heads(init_from):
        heads = load_heads(init_from, lm)
        found = (len(heads), head_type_of(heads))
        if found != (extra, head_type):
            raise HeadsError(f"model.init_from={init_from} has {found[0]} extra MTP heads of "
                             f"type {found[1]}; loss.heads={extra + 1}, loss.head_type="
                             f"{head_type} asks for {extra} of type {head_type}")
    else:
        heads = new_heads(lm, extra, head_type)
    return MTPModel(lm, heads)


def heads_config(config: Any, count: int, head_type: str) -> dict[str, Any]:
    return {"heads": count + 1, "extra_heads": count, "head_type": head_type,
            "block": f"{config.model_type} decoder layer", "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "num_hidden_layers": config.num_hidden_layers}


def save_heads(state: dict[str, torch.Tensor], config: Any, out: Path,
               head_type: str = "parallel") -> int:
    """Write the extra heads found in a full state dict (keys `mtp_heads.*`) beside an export;
    returns how many there were (0: nothing written)."""
    tensors = {k[len(PREFIX):]: v.contiguous() for k, v in state.items() if k.startswith(PREFIX)}
    count = len({k.split(".", 1)[0] for k in tensors})
    if count:
        save_file(tensors, str(out / HEADS_FILE), metadata={"format": "pt"})
        (out / HEADS_CONFIG).write_text(json.dumps(heads_config(config, count, head_type),
                                                   indent=1))
    return count


def has_heads(path: str | Path) -> bool:
    return (Path(path) / HEADS_FILE).is_file() or (Path(path) / HEADS_CONFIG).is_file()


def stored_head_type(path: str | Path) -> str | None:
    """The type of the heads beside a model folder (None: none, or unreadable)."""
    try:
        return str(json.loads((Path(path) / HEADS_CONFIG).read_text())["head_type"])
    except (OSError, ValueError, KeyError):
        return None


def load_heads(path: str | Path, lm: PreTrainedModel) -> nn.ModuleList:
    """The extra heads stored beside the model folder `path`, checked against `lm`."""
    path = Path(path)
    if not has_heads(path):
        raise HeadsError(f"{path} has no MTP heads ({HEADS_FILE} is missing): it was trained "
                         "without loss=mtp, or exported before heads were kept; decode it "
                         "with plain greedy decoding")
    try:
        meta = json.loads((path / HEADS_CONFIG).read_text())
        extra = int(meta["extra_heads"])
        state = load_file(str(path / HEADS_FILE))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HeadsError(f"the MTP heads in {path} are unreadable ({type(e).__name__}: {e}); "
                         f"re-export the checkpoint (train/export_hf.py)") from e
    if meta.get("head_type") not in HEAD_TYPES:
        raise HeadsError(f"the MTP heads in {path} are of type {meta.get('head_type')!r}; "
                         f"this version knows {HEAD_TYPES}")
    c = lm.config
    for key in ("hidden_size", "vocab_size"):
        if meta.get(key) != getattr(c, key):
            raise HeadsError(f"the MTP heads in {path} were made for {key}={meta.get(key)}, "
                             f"the model has {getattr(c, key)}")
    heads = new_heads(lm, extra, meta["head_type"])
    expected = heads.state_dict()
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        raise HeadsError(f"the MTP heads in {path} do not fit this model's shape: "
                         + "; ".join(wrong + [f"missing {m}" for m in missing[:5]]
                                     + [f"unexpected {u}" for u in unexpected[:5]]))
    heads.load_state_dict(state)
    return heads.to(dtype=lm.dtype)
