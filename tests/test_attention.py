"""Document masking: every attention kernel ipt can select keeps documents apart."""

import pytest
import torch

from ipt import attention
from ipt.config import ConfigError

CPU = torch.device("cpu")


def test_documents_start_where_positions_restart_and_at_every_row():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3]])
    cu, longest = attention.documents(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 12, 14, 18]
    assert longest == 6
    docs = attention.Documents(cu, longest, 3, 6).doc_ids()
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2], [3] * 6, [4, 4, 5, 5, 5, 5]]


def test_the_block_diagonal_mask_keeps_documents_and_rows_apart():
    pos = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])
    cu, longest = attention.documents(pos)
    mask = attention.Documents(cu, longest, 2, 4).inputs("sdpa")["ipt_masks"][None]
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert mask[1, 0].int().tolist() == torch.ones(4, 4).tril().int().tolist()


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("kernel", attention.KERNELS)
def test_packed_logits_equal_each_document_alone(kernel, window):
    """B = 3 rows of packed documents give the logits each document gets alone, with a
    backward where the kernel has one here (flex has none on the CPU); with a sliding window
    (a Mistral), too."""
    grad = attention.why_not(kernel, CPU, torch.float32, training=True) is None
    why = attention.why_not(kernel, CPU, torch.float32, training=False)
    if why is not None:
        pytest.skip(f"{kernel} cannot run on this machine: {why}")
    assert attention.parity_error(kernel, CPU, grad=grad, window=window) < 1e-4


def test_a_bare_call_with_restarting_positions_is_masked_too_and_leaks_without():
    """A call that brings no document inputs (`model(input_ids, position_ids)`) still keeps
    documents apart, from its position ids; with positions that do not restart, document A
    leaks into B, so the comparison can fail."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         use_cache=False)
    attention.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.registered_name("sdpa")).eval()
    a, b = torch.randint(3, 32, (1, 6)), torch.randint(3, 32, (1, 5))
    packed = torch.cat([a, b], dim=1).repeat(2, 1)
    restart = torch.cat([torch.arange(6), torch.arange(5)])[None].repeat(2, 1)
    with torch.no_grad():
        alone = model(input_ids=b).logits
        masked = model(input_ids=packed, position_ids=restart).logits[:, 6:]
        leaky = model(input_ids=packed).logits[:, 6:]
    torch.testing.assert_close(masked, alone.expand(2, -1, -1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky[:1], alone, atol=1e-3)


def test_auto_picks_sdpa_on_the_cpu_and_refuses_what_cannot_run():
    assert attention.choose("auto", CPU, torch.float32) == "sdpa"
    assert attention.choose("sdpa", CPU, torch.bfloat16) == "sdpa"
    for kernel, why in [("varlen", "CUDA"), ("flex", "no backward"),
                        ("flash_attention_2", "use model.attn_implementation=flash_attn"),
                        ("naive", "not one of")]:
        with pytest.raises(ConfigError, match=why):
            attention.choose(kernel, CPU, torch.float32)


def test_flex_compiles_at_most_twice_for_the_shapes_of_a_decomposed_run():
    """The micro-batches of pieces of 16, 32 and 64 tokens (2 x 64 tokens each), then
    validation's: one compile, and one more once the sizes change (counted by Dynamo's
    counting backend; on a GPU the backend is inductor)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    flex = attention.compiled_flex(counter)
    for batch, seq in [(2, 64), (8, 16), (4, 32), (2, 64), (8, 16), (2, 64)]:
        ends = torch.arange(0, batch * seq + 1, seq // 2, dtype=torch.int32)  # 2 docs a row
        block = attention.Documents(ends, seq // 2, batch, seq).inputs("flex")["ipt_block_masks"][None]
        q, k, v = torch.randn(batch, 4, seq, 8), *torch.randn(2, batch, 2, seq, 8)
        flex(q, k, v, block_mask=block, enable_gqa=True)
    assert counter.frame_count <= 2
