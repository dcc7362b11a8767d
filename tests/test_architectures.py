"""Continual pre-training from any causal LM `transformers` loads: a folder of each family
trains through the real entry point (fused loss, MTP heads, KD), and exports as itself; an
architecture MTP heads cannot be built for is refused by name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ipt.observe import read_metrics

from . import families
from .conftest import run_pretrain, tiny_overrides

# A tiny random model of each family (hidden size 32, 2 layers), and the MTP head type its
# run trains: both types on an RMSNorm family and on a LayerNorm family.
SHAPES = {
    "llama": ("LlamaConfig", dict(intermediate_size=64, num_attention_heads=4,
                                  num_key_value_heads=2), "parallel"),
    "qwen2": ("Qwen2Config", dict(intermediate_size=64, num_attention_heads=4,
                                  num_key_value_heads=2), "sequential"),
    "mistral": ("MistralConfig", dict(intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2), "parallel"),
    "gpt_neox": ("GPTNeoXConfig", dict(intermediate_size=64, num_attention_heads=4,
                                       rotary_pct=0.25), "sequential"),
    "gpt2": ("GPT2Config", dict(n_head=4, n_positions=128), "parallel"),
}


def save_tiny(family: str, data_dir: Path, out: Path) -> Path:
    """A random `family` causal LM over the test tokenizer, saved with it."""
    import transformers
    from transformers import AutoModelForCausalLM

    from ipt.data import tokenizer as tok

    tokenizer = tok.load(data_dir / "tokenizer")
    config_class, shape, _ = SHAPES[family]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
        max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny(f, data_dir, root / f) for f in SHAPES}


# The Llama layout is trained by every other test: its family runs with the slow tests.
FAMILIES = [pytest.param(f, marks=pytest.mark.slow) if f in ("llama", "qwen2", "mistral")
            else f for f in SHAPES]


@pytest.mark.parametrize("family", FAMILIES)
def test_continual_pretraining_trains_each_family_with_mtp_heads(family, folders, data_dir,
                                                                 tmp_path):
    """Two steps from the folder with an extra MTP head (the fused loss); the export is the
    same architecture, with its head beside it."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / family
    head_type = SHAPES[family][2]
    run_pretrain(tiny_overrides(data_dir, run, **{
        "model.init_from": folders[family], "loss": "mtp", "loss.heads": 2,
        "loss.head_type": head_type, "loss.chunk_size": 40, "train.max_steps": 2,
        "train.eval_every": 0, "train.checkpoint_every": 2, "train.export_at_end": True}))
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    exported = AutoModelForCausalLM.from_pretrained(run / "hf")
    original = AutoModelForCausalLM.from_pretrained(folders[family])
    assert type(exported) is type(original)
    assert (run / "hf" / "mtp_heads.safetensors").is_file()
    trained = dict(exported.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in original.named_parameters())


def test_a_gpt2_student_learns_from_a_gpt_neox_teacher(folders, data_dir, tmp_path):
    """Online KD: the teacher's hidden states and unembedding come from its own accessors."""
    run = tmp_path / "kd"
    run_pretrain(tiny_overrides(data_dir, run, **{
        "model.init_from": folders["gpt2"], "teacher.path": folders["gpt_neox"],
        "teacher.kd_steps": 2, "train.max_steps": 2, "train.eval_every": 0,
        "train.checkpoint_every": 2}))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["kd_weight"] for r in rows] == [0.5] * 2
    assert all(math.isfinite(r["kd"]) and math.isfinite(r["ce"]) for r in rows)


def test_mtp_heads_are_refused_naming_an_architecture_without_a_final_norm(data_dir, tmp_path):
    """OPT with post-layer norms ends in no final norm the heads could share: the refusal
    names the architecture."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from ipt.mtp.heads import HeadsError, new_heads

    lm = AutoModelForCausalLM.from_config(OPTConfig(
        vocab_size=64, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, do_layer_norm_before=False))
    with pytest.raises(HeadsError, match="OPTForCausalLM has no single final norm"):
        new_heads(lm, 1)


def test_a_causal_lm_whose_logits_follow_no_known_rule_is_refused_by_name():
    """Cohere multiplies its logits by the `logit_scale` it read at construction: with its
    config saying otherwise, the fused loss would compute other logits than the model's, and
    the start-up check refuses it, naming the class."""
    from transformers import AutoModelForCausalLM, CohereConfig

    from ipt.config import ConfigError
    from ipt.model import check_unembedding

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(CohereConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logit_scale=0.0625))
    check_unembedding(lm, "model.init_from=x")  # its rule: logits x 0.0625
    lm.config.logit_scale = 1.0
    with pytest.raises(ConfigError, match="model.init_from=x: CohereForCausalLM computes its"):
        check_unembedding(lm, "model.init_from=x")


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_mtp_heads_of_each_family_see_only_their_document(family, head_type, data_dir,
                                                          tmp_path):
    """A GPT-2 block takes its mask and cache by position, a GPT-NeoX layer its cache as
    `layer_past`: the heads still get the document mask the last layer got, so a document
    packed after another gives every head what it gives alone."""
    from transformers import AutoModelForCausalLM

    from ipt import attention
    from ipt.mtp.heads import attach

    attention.register()
    lm = AutoModelForCausalLM.from_pretrained(save_tiny(family, data_dir, tmp_path / family),
                                              attn_implementation=attention.registered_name("sdpa"))
    model = attach(lm, 2, None, head_type).eval()
    torch.manual_seed(1)
    first, second = torch.randint(3, 500, (1, 11)), torch.randint(3, 500, (1, 13))
    ids = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(13)])[None]
    batch = {"input_ids": ids, "position_ids": positions}
    with torch.no_grad():
        packed = model.hidden(ids, documents=attention.model_inputs(batch, model))
        alone = model.hidden(second, position_ids=torch.arange(13)[None])
    assert len(packed) == 3
    # a sequential head reads the next tokens' embeddings: the last k positions of the
    # first document see the second's, so compare the second document only
    for p, a in zip(packed, alone, strict=True):
        torch.testing.assert_close(p[:, 11:], a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_each_family_trains_on_the_entry_point_and_its_export_computes_what_ipt_does(
        family, data_dir, tmp_path):
    """Two steps from the family's folder (loss=ntp, attention auto); the export loads in
    transformers as the same class and config, and its eager forward of each document alone
    gives the per-token loss ipt computes for them packed."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from ipt import attention
    from ipt.config import ModelConfig
    from ipt.data import tokenizer as tok
    from ipt.losses.base import IGNORE
    from ipt.model import FusedLM, build_model

    from .test_families import packed_batch, relative, their_losses

    tokenizer = tok.load(data_dir / "tokenizer")
    folder = tmp_path / "folder"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(families.config(family, vocab=len(tokenizer))
                                     ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = tmp_path / "run"
    run_pretrain(tiny_overrides(data_dir, run, **{
        "model.init_from": folder, "train.max_steps": 2, "train.eval_every": 0,
        "train.checkpoint_every": 2, "train.export_at_end": True}))
    rows = read_metrics(run / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows)
    if families.FAMILIES[family][1].get("output_router_logits"):
        assert all(r["router_aux"] > 0 for r in rows)

    theirs = AutoModelForCausalLM.from_pretrained(run / "hf", attn_implementation="eager")
    original = AutoModelForCausalLM.from_pretrained(folder)
    assert type(theirs) is type(original)
    assert attention.needs(theirs.config) == attention.needs(original.config)
    kernel = attention.choose("auto", torch.device("cpu"), torch.float32,
                              model=attention.needs(theirs.config))
    ours = FusedLM(build_model(ModelConfig(name="x", init_from=str(run / "hf")),
                               len(tokenizer), kernel=kernel)).eval()
    batch, docs = packed_batch()
    keep = batch["labels"].flatten() != IGNORE
    with torch.no_grad():
        h = ours.hidden(batch["input_ids"], documents=attention.model_inputs(batch, ours))[0]
        per_token = F.cross_entropy(ours.logits(h).flatten(0, 1),
                                    batch["labels"].flatten().clamp(min=0), reduction="none")
        reference, _ = their_losses(theirs.eval(), docs)
    assert relative(per_token[keep], reference[keep]) < 1e-5
