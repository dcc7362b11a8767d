"""A causal LM with n - 1 extra prediction heads (the parallel heads of Gloeckle et al.).

Head 1 is the model itself: its last decoder layer, final norm and unembedding. Heads 2..n
are further decoder layers of the model's own block type; they read what the last layer
reads (the output z of layer L - 1) and share the final norm and the unembedding. Head i
predicts token t + i. Dropping the extra heads leaves the ordinary `transformers` model, so
the export is a plain causal LM with the heads in a file beside it:

    mtp_heads.safetensors   the extra heads' weights (`<k>.<parameter>`, k = 0 for head 2)
    mtp_config.json         how many, of which block type, for which model shape

The heads see exactly what the last layer sees: a forward pre-hook on it captures z and the
keyword arguments it got (attention mask, rotary embeddings, positions), whatever attention
kernel or document masking the model uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

HEADS_FILE = "mtp_heads.safetensors"
HEADS_CONFIG = "mtp_config.json"
PREFIX = "mtp_heads."
HEAD_TYPES = ("parallel",)  # DeepSeek-V3's sequential modules would be the second


class HeadsError(ValueError):
    """Heads that do not fit the model, or a model without heads where they are needed."""


def new_heads(lm: PreTrainedModel, count: int) -> nn.ModuleList:
    """`count` freshly initialised decoder layers of the model's own type (seeded by the
    caller); head k keeps its own KV cache slot k when decoding."""
    kinds = set(getattr(lm.config, "layer_types", None) or ())
    if len(kinds) > 1:  # a head gets the last layer's mask, so all layers must share one kind
        raise HeadsError(f"MTP heads need one attention type in every layer; this model mixes "
                         f"{sorted(kinds)}")
    block = type(lm.model.layers[-1])
    heads = nn.ModuleList(block(lm.config, layer_idx=k) for k in range(count))
    heads.apply(lm._init_weights)
    return heads.to(dtype=lm.dtype)


class MTPModel(nn.Module):
    """The module the training engine wraps: `model`, `lm_head` (the causal LM's own modules,
    so their state-dict keys stay the causal LM's) and `mtp_heads`."""

    def __init__(self, lm: PreTrainedModel, heads: nn.ModuleList) -> None:
        super().__init__()
        self.model, self.lm_head, self.mtp_heads = lm.model, lm.lm_head, heads
        self.config = lm.config
        object.__setattr__(self, "lm", lm)  # the whole causal LM, not registered twice
        self._seen: tuple[torch.Tensor, dict[str, Any]] | None = None
        if len(heads):
            lm.model.layers[-1].register_forward_pre_hook(self._capture, with_kwargs=True)
        # The fused loss reads the unembedding directly rather than calling its module: under
        # ZeRO-3 this keeps it gathered for the whole forward (elsewhere it is a no-op).
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(self, self.lm_head.weight)

    @property
    def n(self) -> int:
        return len(self.mtp_heads) + 1

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        z = args[0] if args else kwargs["hidden_states"]
        self._seen = (z, {k: v for k, v in kwargs.items() if k != "hidden_states"})

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               past: Any = None, head_past: Any = None,
               heads: bool = True) -> list[torch.Tensor]:
        """The normed hidden states of every head, [batch, seq, hidden] each, head 1 first
        (head 1's alone when not `heads`). `past` / `head_past`: KV caches of the model and
        of the heads, when decoding."""
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=past,
                         use_cache=past is not None)
        hs = [out.last_hidden_state]
        if heads and len(self.mtp_heads):
            assert self._seen is not None, "the last layer's pre-hook did not run"
            z, kwargs = self._seen
            self._seen = None
            kwargs = {**kwargs, "past_key_values": head_past}
            for head in self.mtp_heads:
                h = head(z, **kwargs)
                hs.append(self.model.norm(h[0] if isinstance(h, tuple) else h))
        return hs

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, scales: list[float],
                position_ids: torch.Tensor | None = None, kd: Any = None,
                memory_efficient: bool = True, chunk_size: int = 1024,
                heads: bool = True) -> Any:
        """The weighted loss of every head (see `ipt.mtp.loss`), or of head 1 alone when not
        `heads`: run inside the engine's forward, so ZeRO-3 gathers what it uses and sees one
        forward and one backward."""
        from ipt.mtp.loss import heads_loss

        hs = self.hidden(input_ids, position_ids, heads=heads)
        return heads_loss(hs, self.lm_head, targets, scales, kd, memory_efficient, chunk_size)


def attach(lm: PreTrainedModel, extra: int, init_from: str | None) -> MTPModel:
    """`lm` with `extra` heads: those saved beside `init_from` when it has them (continual
    pre-training of an MTP model), else new ones."""
    if init_from is not None and has_heads(init_from):
        heads = load_heads(init_from, lm)
        if len(heads) != extra:
            raise HeadsError(f"model.init_from={init_from} has {len(heads)} extra MTP heads, "
                             f"loss.heads={extra + 1} asks for {extra}")
    else:
        heads = new_heads(lm, extra)
    return MTPModel(lm, heads)


def heads_config(config: Any, count: int) -> dict[str, Any]:
    return {"heads": count + 1, "extra_heads": count, "head_type": "parallel",
            "block": f"{config.model_type} decoder layer", "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "num_hidden_layers": config.num_hidden_layers}


def save_heads(state: dict[str, torch.Tensor], config: Any, out: Path) -> int:
    """Write the extra heads found in a full state dict (keys `mtp_heads.*`) beside an export;
    returns how many there were (0: nothing written)."""
    tensors = {k[len(PREFIX):]: v.contiguous() for k, v in state.items() if k.startswith(PREFIX)}
    count = len({k.split(".", 1)[0] for k in tensors})
    if count:
        save_file(tensors, str(out / HEADS_FILE), metadata={"format": "pt"})
        (out / HEADS_CONFIG).write_text(json.dumps(heads_config(config, count), indent=1))
    return count


def has_heads(path: str | Path) -> bool:
    return (Path(path) / HEADS_FILE).is_file() or (Path(path) / HEADS_CONFIG).is_file()


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
                         f"this version decodes {HEAD_TYPES}")
    c = lm.config
    for key in ("hidden_size", "vocab_size"):
        if meta.get(key) != getattr(c, key):
            raise HeadsError(f"the MTP heads in {path} were made for {key}={meta.get(key)}, "
                             f"the model has {getattr(c, key)}")
    heads = new_heads(lm, extra)
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
