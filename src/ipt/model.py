"""Causal LMs from `transformers`: a Llama built from a config, or any causal LM loaded for
continual pre-training, with the attention kernel chosen by what the machine has; and
`FusedLM`, the module the training engine wraps, whose forward is the loss.

Nothing here assumes a Llama's layout (`model.layers`, `model.norm`, `lm_head`): the decoder,
the embeddings and the unembedding come from transformers' own accessors (`get_decoder()`,
`get_input_embeddings()`, `get_output_embeddings()`), and the layer stack and final norm,
which transformers has no accessor for, are found by what they are (`layer_stack`,
`final_norm`), so a GPT-2 (`transformer.h`, `ln_f`) or a GPT-NeoX (`gpt_neox.layers`,
`final_layer_norm`) trains as a Llama does."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from ipt import attention
from ipt.config import ConfigError, ModelConfig
from ipt.losses.logits import LogitRule, logit_rule
from ipt.zero3 import numel, partitioned, whole

# The names a model or decoder layer takes its KV cache by, in transformers 5.x.
CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


def cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` (a `transformers.Cache`) to a model or decoder
    layer. transformers 5.24 renamed `past_key_values` to `cache` and, on the inner model and
    its layers, ignores the old name without an error (a GPT-NeoX layer calls it
    `layer_past`), so the name is read off the signature rather than assumed."""
    cls = type(module)
    if cls not in _CACHE_NAMES:
        params = inspect.signature(cls.forward).parameters
        _CACHE_NAMES[cls] = next((n for n in CACHE_KWARGS if n in params), "past_key_values")
    return {_CACHE_NAMES[cls]: cache}


_CACHE_NAMES: dict[type, str] = {}


def architecture(lm: torch.nn.Module) -> str:
    """The causal LM's class name, for messages: `GPTNeoXForCausalLM`."""
    return type(lm).__name__


def layer_stack(lm: PreTrainedModel) -> torch.nn.ModuleList | None:
    """The decoder's layers: its one child list of `num_hidden_layers` modules (`model.layers`
    of a Llama, `transformer.h` of a GPT-2); None where there is no such list."""
    decoder = lm.get_decoder()
    count = getattr(lm.config, "num_hidden_layers", None)
    found = [m for m in decoder.children()
             if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return found[0] if len(found) == 1 else None


def final_norm(lm: PreTrainedModel) -> torch.nn.Module | None:
    """The norm the decoder applies after its last layer: its one child that is a norm
    (`model.norm`, `transformer.ln_f`, `gpt_neox.final_layer_norm`); None where there is no
    such child (an OPT with post-layer norms ends in none)."""
    found = [m for m in lm.get_decoder().children() if isinstance(m, torch.nn.LayerNorm)
             or type(m).__name__.endswith("Norm")]
    return found[0] if len(found) == 1 else None


def unembedding(lm: PreTrainedModel) -> torch.nn.Module:
    """The output embedding (`get_output_embeddings()`), which the fused loss multiplies by
    the decoder's last hidden state (and whose bias it adds, if it has one)."""
    head = lm.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ConfigError(f"{architecture(lm)} has no output embedding ipt can read "
                          "(get_output_embeddings() gives none): it cannot be trained here")
    return head


@torch.no_grad()
def check_unembedding(lm: PreTrainedModel, what: str) -> None:
    """Refuse a causal LM whose logits are not what the fused loss and online KD compute:
    its output embedding of its decoder's last hidden state, plus the embedding's bias,
    through its family's `LogitRule` (a logit scale, a final soft-cap). One forward of 4
    tokens, whose decoder output a hook keeps, compared with the family's own logits. A
    partitioned model runs it inside its engine, on every rank together, and gathers only
    its output embedding."""
    head = unembedding(lm)
    rule = logit_rule(lm.config)
    seen: list[torch.Tensor] = []
    hook = lm.get_decoder().register_forward_hook(
        lambda module, args, out: seen.append(out.last_hidden_state))
    training = lm.training
    lm.eval()
    try:
        ids = torch.arange(min(4, lm.config.vocab_size), device=next(lm.parameters()).device)
        theirs = lm(input_ids=ids[None]).logits.float()
    finally:
        hook.remove()
        lm.train(training)
    with whole(head):
        weight, bias = head.weight, getattr(head, "bias", None)
        assert isinstance(weight, torch.Tensor)  # `unembedding` checked it
        ours = seen[-1].float() @ weight.float().T
        if isinstance(bias, torch.Tensor):
            ours += bias.float()
    ours = rule(ours)
    tol = max(1e-3, 4 * torch.finfo(weight.dtype).eps)  # bf16 rounds its logits
    scale = float(theirs.abs().max()) or 1.0
    if not torch.allclose(ours, theirs, rtol=tol, atol=tol * scale):
        raise ConfigError(f"{what}: {architecture(lm)} computes its logits otherwise than as "
                          f"its output embedding of its decoder's last hidden state (plus a "
                          f"bias) through {rule}, which ipt's fused loss and KD compute; it "
                          "cannot be trained here")


def experts(config: Any) -> int:
    """How many experts the layers of a mixture-of-experts family route among (0: dense)."""
    return int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0)
               or 0)


@dataclass(frozen=True)
class RouterLoss:
    """A mixture-of-experts family's auxiliary loss, as its causal LM computes it: its own
    `load_balancing_loss_func` of the router logits its decoder records, times
    `router_aux_loss_coef`, over every token of the micro-batch."""

    balance: Callable[..., torch.Tensor]
    experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.balance(router_logits, self.experts, self.top_k, None)


def router_loss(lm: PreTrainedModel) -> RouterLoss | None:
    """The router loss `lm`'s family adds in training (`output_router_logits`; None for a
    dense model, or one configured without it), or a refusal naming what ipt cannot compute."""
    config = lm.config
    if not experts(config) or not getattr(config, "output_router_logits", False):
        return None
    name = architecture(lm)
    if getattr(config, "router_z_loss_coef", 0):
        raise ConfigError(f"{name} adds a router z-loss (router_z_loss_coef), which ipt does "
                          "not compute; it cannot be trained here")
    balance = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
    top_k = getattr(lm, "num_experts_per_tok", None)
    if balance is None or top_k is None:
        raise ConfigError(f"{name} asks for its router's load-balancing loss "
                          "(output_router_logits=true), and its transformers module has no "
                          "load_balancing_loss_func ipt can call; set output_router_logits "
                          "to false in its config.json to train without it")
    return RouterLoss(balance, experts(config), int(top_k),
                      float(getattr(config, "router_aux_loss_coef", 0.0)))


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


def source_config(cfg: ModelConfig, vocab_size: int, bos_id: int = 1,
                  eos_id: int = 2) -> Any:
    """The transformers config of the model `cfg` trains: the folder's (`init_from`), or a
    Llama's of `cfg`'s shape; read before anything is built, to choose the attention kernel
    (`ipt.attention.needs`)."""
    if cfg.init_from:
        return AutoConfig.from_pretrained(cfg.init_from)
    return llama_config(cfg, vocab_size, bos_id, eos_id)


def check_vocabulary(config: Any, vocab_size: int, what: str) -> None:
    """A model's output layer must cover the tokenizer; rows past it (a vocabulary padded to
    a multiple, as Qwen2.5's and Pythia's) are kept and trained as its family does."""
    if config.vocab_size < vocab_size:
        raise ConfigError(f"{what} has a vocabulary of {config.vocab_size}, the tokenizer has "
                          f"{vocab_size}: the tokenizer's last ids have no embedding")


def build_model(cfg: ModelConfig, vocab_size: int, bos_id: int = 1, eos_id: int = 2,
                kernel: str = "sdpa", zero3: dict[str, Any] | None = None) -> PreTrainedModel:
    """Random init from `cfg` (seeded by the caller), or `from_pretrained(cfg.init_from)`,
    with ipt's attention `kernel` (see `ipt.attention`; `choose` picks it). With `zero3`
    (the run's DeepSpeed config at stage 3), `init_from` is loaded `partitioned`. The caller
    checks the loaded model's logits (`check_unembedding`): a partitioned model can run a
    forward only inside its engine."""
    attention.register()
    attn = attention.registered_name(kernel)
    if cfg.init_from:
        check_vocabulary(AutoConfig.from_pretrained(cfg.init_from), vocab_size,
                         f"model.init_from={cfg.init_from}")
        with partitioned(zero3):
            model = AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32,
                                                         attn_implementation=attn)
    else:
        config = llama_config(cfg, vocab_size, bos_id, eos_id)
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                                 dtype=torch.float32)
    model.config.use_cache = False
    return model


def _embedding_numel(model: torch.nn.Module) -> int:
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return numel(embeddings.weight)


def count_params(model: torch.nn.Module, exclude_embeddings: bool = True) -> int:
    n = sum(numel(p) for p in model.parameters())
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
    if head_params is None and extra_heads:
        layers = layer_stack(model)
        assert layers is not None, f"{architecture(model)} has no decoder layers to count"
        head_params = sum(numel(p) for p in layers[-1].parameters())
    head_params = head_params or 0
    per_head = 6 * (head_params + c.vocab_size * c.hidden_size) + 12 * c.hidden_size * seq_len
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq_len + extra_heads * per_head


def decoder_layers(model: torch.nn.Module, what: str) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM (or of a `FusedLM`'s), then any MTP heads' blocks,
    in order; `what` needs them, and is named where the model has none ipt can find."""
    lm: Any = getattr(model, "lm", model)
    stack = layer_stack(lm)
    if stack is None:
        raise ConfigError(f"{what} works on decoder layers, and {architecture(lm)} has no "
                          "list of them ipt can find; leave it off for this model")
    layers = list(stack)
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
    what = f"train.activation_checkpointing={mode}"
    for i, layer in enumerate(decoder_layers(model, what)):
        on = mode == "full" or i % every == 0
        if not hasattr(layer, "gradient_checkpointing"):
            raise ConfigError(f"{what}: {type(layer).__name__} "
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
    layers = decoder_layers(model, "train.compile=true")
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return len(layers)


class FusedLM(torch.nn.Module):
    """The module the training engine wraps: the causal LM's own modules, registered under
    their own names, so the state-dict keys stay the causal LM's (`model.*` of a Llama,
    `gpt_neox.*` of a GPT-NeoX). Its forward is the fused unembedding and loss of its heads'
    hidden states (`ipt.losses.fused`), the logits made as the family makes them
    (`logit_rule`): here head 1 alone; a technique that adds heads extends `hidden`
    (`ipt.mtp.heads.MTPModel`)."""

    lm: PreTrainedModel
    logit_rule: LogitRule
    router: RouterLoss | None  # a mixture of experts' load-balancing loss

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.config = lm.config
        object.__setattr__(self, "lm", lm)  # the whole causal LM, not registered twice
        # The fused loss reads the unembedding directly rather than calling its module: under
        # ZeRO-3 this keeps it gathered for the whole forward (elsewhere it is a no-op).
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        head = self.unembedding
        register_external_parameter(self, head.weight)
        if isinstance(getattr(head, "bias", None), torch.Tensor):
            register_external_parameter(self, head.bias)
        self.logit_rule = logit_rule(lm.config)
        self.router = router_loss(lm)
        self.router_logits: tuple[torch.Tensor, ...] = ()  # of the last `hidden`, per layer

    @property
    def decoder(self) -> Any:
        """The causal LM's decoder (`get_decoder()`): the layers and final norm, no head."""
        return self.lm.get_decoder()

    @property
    def unembedding(self) -> Any:
        """The causal LM's output embedding (`get_output_embeddings()`)."""
        return unembedding(self.lm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The family's logits of hidden states `h` (any head's)."""
        return self.logit_rule(self.unembedding(h))

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               past: Any = None, head_past: Any = None, heads: bool = True,
               documents: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """The normed hidden states of every head, [batch, seq, hidden] each, head 1 first
        (head 1's alone when not `heads`). `past` / `head_past`: KV caches of the model and
        of any extra heads, when decoding; `documents`: position ids and the attention
        kernel's document inputs (`ipt.attention.model_inputs`), which replace
        `position_ids`."""
        inputs: dict[str, Any] = dict(documents) if documents is not None \
            else {"position_ids": position_ids}
        if self.router is not None:
            inputs["output_router_logits"] = True
        decoder = self.decoder
        out = decoder(input_ids=input_ids, use_cache=past is not None,
                      **cache_kwargs(decoder, past), **inputs)
        if self.router is not None:
            self.router_logits = tuple(out.router_logits)
        return [out.last_hidden_state]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, scales: list[Any],
                documents: dict[str, Any] | None = None, kd: Any = None,
                memory_efficient: bool = True, chunk_size: int = 1024,
                heads: bool = True) -> Any:
        """(loss, CE sum per head, KD sum, router loss or None): the weighted loss of every
        head (`ipt.losses.fused`), or of head 1 alone when not `heads`, plus a mixture of
        experts' router loss times its coefficient in training. Run inside the engine's
        forward, so ZeRO-3 gathers what it uses and sees one forward and one backward.
        `documents`: see `hidden`."""
        from ipt.losses.fused import heads_loss

        hs = self.hidden(input_ids, heads=heads, documents=documents)
        loss, ce, kd_sum = heads_loss(hs, self.unembedding, targets, scales, kd,
                                      memory_efficient, chunk_size, self.logit_rule)
        aux = None
        if self.router is not None:
            aux, self.router_logits = self.router(self.router_logits), ()
            if torch.is_grad_enabled():
                loss = loss + self.router.coef * aux
        return loss, ce, kd_sum, aux
