"""The released families ipt trains, as tiny random configs that keep what each family asks
for: its sliding windows (8 tokens, so that 20-token documents feel them), soft-caps small
enough to bend random scores, logit scales, output biases, vocabularies padded past the
tokenizer, experts. docs/configuration.md's table of families is checked against this list
(tests/test_families.py)."""

from __future__ import annotations

from typing import Any

VOCAB = 96  # the tokenizer's size; a padded family's output layer has PADDED rows
PADDED = 128
WINDOW = 8
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=128)
EXPERTS = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05)

# name: (transformers config class, its settings beyond SHAPE, what it exercises)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", {}, "the reference layout"),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW,
                                  max_window_layers=1, vocab_size=PADDED),
              "padded vocabulary; sliding window on the layers past max_window_layers"),
    "qwen3": ("Qwen3Config", dict(head_dim=8, vocab_size=PADDED),
              "padded vocabulary; q/k norms"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=8, num_experts=4, moe_intermediate_size=32,
                                         vocab_size=PADDED, **EXPERTS),
                  "experts: the router's load-balancing loss"),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), "sliding window on every layer"),
    "mixtral": ("MixtralConfig", dict(sliding_window=WINDOW, num_local_experts=4, **EXPERTS),
                "experts and a sliding window"),
    "gemma2": ("Gemma2Config", dict(head_dim=8, query_pre_attn_scalar=16,
                                    sliding_window=WINDOW,
                                    layer_types=["sliding_attention", "full_attention"],
                                    attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
               "attention and final soft-caps; local and global layers; its own scaling"),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8, query_pre_attn_scalar=16,
                                        sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"],
                                        final_logit_softcapping=2.0),
               "local and global layers with their own RoPE; final soft-cap"),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW), "sliding window; fused projections"),
    "olmo2": ("Olmo2Config", {}, "norms after attention and MLP; q/k norms"),
    "cohere": ("CohereConfig", dict(logit_scale=0.5), "logit scale; parallel block"),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0, attention_multiplier=0.3,
                                      embedding_multiplier=2.0, residual_multiplier=0.5),
                "logits divided by logits_scaling; attention, embedding, residual multipliers"),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.25, vocab_size=PADDED,
                                       num_key_value_heads=None),
                 "padded vocabulary (Pythia); partial rotary"),
    "gpt2": ("GPT2Config", dict(n_positions=128, num_key_value_heads=None,
                                intermediate_size=None),
             "learned positions; LayerNorm; attention dropout (`attn_pdrop`)"),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5, num_key_value_heads=None),
            "an output bias (Phi-2); partial rotary"),
    "gpt_oss": ("GptOssConfig", dict(head_dim=8, num_local_experts=4, sliding_window=WINDOW,
                                     layer_types=["sliding_attention", "full_attention"],
                                     **EXPERTS),
                "attention sinks; experts; local and global layers"),
}


def config(family: str, vocab: int = VOCAB, **extra: Any) -> Any:
    """The tiny config of `family`, its output layer covering a tokenizer of `vocab` tokens
    (padded past it where the family pads)."""
    import transformers

    name, settings, _ = FAMILIES[family]
    merged: dict[str, Any] = {**SHAPE, "vocab_size": vocab, **settings, **extra}
    if merged["vocab_size"] == PADDED:
        merged["vocab_size"] = vocab + PADDED - VOCAB
    merged = {k: v for k, v in merged.items() if v is not None}  # None: not this family's
    return getattr(transformers, name)(**merged, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=None)
