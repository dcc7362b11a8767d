"""Each released family trains exactly as transformers computes it: a packed micro-batch of
several documents through ipt's kernels and fused loss gives, token by token, the loss the
family's own eager forward gives each document alone, and the same gradients (fp32, 1e-5
relative). The oracle is transformers' eager attention with the same weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ipt import attention
from ipt.losses.base import IGNORE

from .families import FAMILIES, VOCAB, config

ROWS = [[12, 20], [5, 17, 10]]  # documents per row of 32 tokens: longer than the window of 8
SEQ = 32
CPU = torch.device("cpu")
TOL = 1e-5


def packed_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[list[torch.Tensor]]]:
    """Rows of documents packed back to back, the next-token labels the loader makes (none
    at a document's last token), and the documents themselves."""
    gen = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(3, VOCAB, (n,), generator=gen) for n in row] for row in ROWS]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    labels = torch.stack([torch.cat([torch.cat([d[1:], torch.tensor([IGNORE])]) for d in row])
                          for row in docs])
    cu, longest = attention.documents(pos)
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "cu_seqlens": cu,
            "max_seqlen": torch.tensor(longest)}, docs


def twins(family: str, kernel: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The family's tiny model with ipt's `kernel`, and the same weights with transformers'
    eager attention."""
    from transformers import AutoModelForCausalLM

    attention.register()
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(config(family), dtype=torch.float32,
                                            attn_implementation=attention.registered_name(kernel))
    theirs = AutoModelForCausalLM.from_config(config(family), dtype=torch.float32,
                                              attn_implementation="eager")
    theirs.load_state_dict(ours.state_dict())
    return ours.eval(), theirs.eval()


def their_losses(lm: torch.nn.Module,
                 docs: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The family's per-token loss of each document alone, in packed order (0 where a document
    ends); and for a mixture of experts, its load-balancing loss (its own
    `load_balancing_loss_func`) of the router logits of every document's tokens."""
    import sys

    out, routed = [], []
    for row in docs:
        for d in row:
            result = lm(input_ids=d[None])
            per_token = F.cross_entropy(result.logits[0].float()[:-1], d[1:], reduction="none")
            out.append(torch.cat([per_token, per_token.new_zeros(1)]))
            routed.append(getattr(result, "router_logits", None))
    if routed[0] is None:
        return torch.cat(out), None
    layers = tuple(torch.cat(per_layer) for per_layer in zip(*routed, strict=True))
    balance = sys.modules[type(lm).__module__].load_balancing_loss_func
    return torch.cat(out), balance(layers, lm.num_experts, lm.num_experts_per_tok, None)


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach(), theirs.detach()
    return float((ours - theirs).norm() / theirs.norm().clamp(min=1e-30))


KERNELS = ["sdpa", "flex", "eager"]  # what runs on the CPU (flex: forward only)
CASES = [pytest.param(f, k, id=f"{f}-{k}") for f in FAMILIES for k in KERNELS]


@pytest.mark.parametrize(("family", "kernel"), CASES)
def test_packed_loss_and_gradients_equal_the_family_forward_of_each_document(family, kernel):
    from ipt.losses.fused import head_targets
    from ipt.model import FusedLM, check_unembedding

    needs = attention.needs(config(family))
    why = attention.why_not(kernel, CPU, torch.float32, training=False, model=needs)
    if why is not None:
        with pytest.raises(Exception, match="cannot run here"):
            attention.choose(kernel, CPU, torch.float32, model=needs)
        pytest.skip(f"{kernel} is refused for {family}: {why}")
    ours, theirs = twins(family, kernel)
    check_unembedding(ours, family)  # the start-up check passes: the logits rule is known
    model = FusedLM(ours)
    batch, docs = packed_batch()
    keep = batch["labels"].flatten() != IGNORE
    documents = attention.model_inputs(batch, model)

    with torch.no_grad():  # per token: ipt's hidden states and logits rule
        h = model.hidden(batch["input_ids"], documents=documents)[0]
        per_token = F.cross_entropy(model.logits(h).flatten(0, 1).float(),
                                    batch["labels"].flatten().clamp(min=0), reduction="none")
    reference, balance = their_losses(theirs, docs)
    assert relative(per_token[keep], reference[keep]) < TOL

    # the fused loss of the step, and its gradients where the kernel has a backward here
    grad = attention.why_not(kernel, CPU, torch.float32, training=True, model=needs) is None
    targets = head_targets(batch["input_ids"], batch["labels"], 1, None)
    count = int(keep.sum())
    with torch.set_grad_enabled(grad):
        loss, ce, _, router = model(input_ids=batch["input_ids"], targets=targets,
                                    scales=[1 / count], documents=documents)
    expected = reference[keep].sum() / count
    if balance is not None:  # in training the family adds coef x its router loss
        assert model.router is not None and router is not None
        assert relative(router, balance) < TOL
        expected = expected + theirs.router_aux_loss_coef * balance * grad
    assert abs(float(loss) - float(expected)) < TOL * float(expected)
    if not grad:
        return
    loss.backward()
    expected.backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = theirs_grads[name].grad
        assert p.grad is not None and g_ref is not None, name
        assert relative(p.grad, g_ref) < TOL, f"{name}: {relative(p.grad, g_ref):.2e}"


def test_a_kernel_named_for_a_feature_it_lacks_is_refused_by_feature():
    needs = attention.needs(config("gemma2"))
    with pytest.raises(Exception, match="sdpa cannot run here: it does not implement an "
                                        "attention soft-cap, which gemma2's layers use"):
        attention.choose("sdpa", CPU, torch.float32, model=needs)
    assert attention.choose("auto", CPU, torch.float32, model=needs) == "eager"
    assert attention.choose("auto", CPU, torch.float32,
                            model=attention.needs(config("mistral"))) == "sdpa"


def test_a_layer_asking_for_an_unbuilt_window_raises_instead_of_dropping_it():
    """The backstop behind the start-up check: masks built without the window a layer asks
    for (a config that hides its windows) stop the forward."""
    from transformers import AutoModelForCausalLM

    attention.register()
    lm = AutoModelForCausalLM.from_config(
        config("mistral"), attn_implementation=attention.registered_name("sdpa"))
    batch, _ = packed_batch()
    docs = attention.Documents(batch["cu_seqlens"], SEQ, 2, SEQ).inputs("sdpa", windows=())
    with pytest.raises(RuntimeError, match="asks for a sliding window of 8 tokens"):
        lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **docs)


def test_the_docs_table_of_families_is_this_test_list():
    """docs/configuration.md lists these families, in this order, with their config classes
    and the CPU kernels that compute them (the rest refused, by feature)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    table = text.split("<!-- families -->")[1].split("<!-- /families -->")[0]
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| [^|]+ \| ([^|]+) \|", table, flags=re.M)
    assert [family for family, _, _ in rows] == list(FAMILIES)
    for family, config_class, kernels in rows:
        assert config_class == FAMILIES[family][0]
        needs = attention.needs(config(family))
        runs = [k for k in KERNELS if attention.why_not(k, CPU, torch.float32, training=False,
                                                         model=needs) is None]
        assert kernels.split(" (")[0].split(", ") == runs, family


def test_mtp_heads_are_refused_for_a_mixture_of_experts():
    from transformers import AutoModelForCausalLM

    from ipt.mtp.heads import HeadsError, new_heads

    lm = AutoModelForCausalLM.from_config(config("mixtral"))
    with pytest.raises(HeadsError, match="MixtralForCausalLM is a mixture of experts"):
        new_heads(lm, 1)


def test_activation_checkpointing_keeps_the_router_loss_and_its_gradients():
    """The router logits a mixture of experts records in its forward reach the loss once,
    and the recomputation in the backward adds no second router loss."""
    from ipt.losses.fused import head_targets
    from ipt.model import FusedLM, checkpoint_layers

    batch, _ = packed_batch()
    targets = head_targets(batch["input_ids"], batch["labels"], 1, None)
    count = int((batch["labels"] != IGNORE).sum())
    runs = []
    for mode in ("none", "full"):
        ours, _ = twins("mixtral", "sdpa")
        model = FusedLM(ours).train()
        checkpoint_layers(model, mode)
        loss, _, _, router = model(input_ids=batch["input_ids"], targets=targets,
                                   scales=[1 / count],
                                   documents=attention.model_inputs(batch, model))
        loss.backward()
        runs.append((float(loss), float(router),
                     {n: p.grad.clone() for n, p in ours.named_parameters()}))
    (loss_a, router_a, grads_a), (loss_b, router_b, grads_b) = runs
    assert (loss_a, router_a) == (loss_b, router_b)
    assert all(relative(grads_b[n], grads_a[n]) < TOL for n in grads_a)


def test_attention_dropout_is_a_feature_a_kernel_implements_or_is_refused_for():
    """GPT-2 drops attention weights in training (`attn_pdrop`, 0.1 by default): flex, which
    cannot, is refused by name, and SDPA, which can, is chosen."""
    from transformers import GPT2Config

    needs = attention.needs(GPT2Config())
    assert needs.dropout == 0.1
    assert "attention dropout" in attention.why_not("flex", torch.device("cuda"), torch.float32,
                                                    model=needs)
    assert attention.choose("auto", CPU, torch.float32, model=needs) == "sdpa"
