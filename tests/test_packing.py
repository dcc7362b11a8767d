"""Packing keeps every token of every document, respects boundaries, and fills sequences."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ipt.data.loader import PackedShards
from ipt.data.packing import assemble, pack
from ipt.data.shards import ShardSet, write_shards
from ipt.losses import IGNORE

LENS = np.array([5, 17, 3, 40, 8, 1, 12, 9, 30, 2])


def covered(packing, lens):
    """(doc, token) pairs each sequence holds; every token must appear exactly once."""
    seen = []
    for i in range(len(packing)):
        for s in packing.segments(i):
            d, a, n = packing.doc[s], packing.start[s], packing.length[s]
            seen += [(int(d), int(t)) for t in range(a, a + n)]
    return sorted(seen)


@pytest.mark.parametrize("how", ["bestfit", "concat"])
def test_every_token_is_packed_exactly_once(how):
    p = pack(LENS, 16, how)
    assert covered(p, LENS) == [(d, t) for d, n in enumerate(LENS) for t in range(n)]
    for i in range(len(p)):
        assert sum(p.length[s] for s in p.segments(i)) <= 16


def test_bestfit_splits_only_documents_longer_than_a_sequence():
    p = pack(LENS, 16, "bestfit")
    pieces = np.bincount(p.doc, minlength=len(LENS))
    assert all(pieces[d] == 1 for d in np.flatnonzero(LENS <= 16))


def test_bestfit_fills_better_than_concat_needs_no_split():
    best, concat = pack(LENS, 16, "bestfit"), pack(LENS, 16, "concat")
    assert len(best) <= len(concat) + 1
    assert best.fill(16) > 0.85


def shard_of(docs, tmp_path: Path, channels=None):
    from ipt.data.shards import ShardWriter

    w = ShardWriter(tmp_path / "s", 100, "fp", channels={"loss_mask": "uint8"} if channels else {})
    for i, d in enumerate(docs):
        w.add(d, **({"loss_mask": channels[i]} if channels else {}))
    w.close()
    return ShardSet(tmp_path)


def test_targets_stay_inside_documents(tmp_path):
    docs = [[1, 10, 11, 12, 2], [1, 20, 21, 2]]
    item = PackedShards(shard_of(docs, tmp_path), seq_len=16)[0]
    ids, labels, pos = (item[k].tolist() for k in ("input_ids", "labels", "position_ids"))
    # one sequence holding both documents (largest first), then padding
    assert ids[:9] == [1, 10, 11, 12, 2, 1, 20, 21, 2]
    assert labels[:9] == [10, 11, 12, 2, IGNORE, 20, 21, 2, IGNORE]
    assert pos[:9] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert set(labels[9:]) == {IGNORE}


def test_split_document_keeps_its_target_across_the_cut(tmp_path):
    doc = list(range(1, 21))  # 20 tokens, sequences of 8
    ds = PackedShards(shard_of([doc], tmp_path), seq_len=8, packing="concat")
    first = ds[0]
    assert first["input_ids"].tolist() == doc[:8]
    assert first["labels"].tolist() == doc[1:9]  # the last target is the next piece's first


def test_without_doc_masking_positions_run_through_the_sequence(tmp_path):
    docs = [[1, 10, 2], [1, 20, 2]]
    item = PackedShards(shard_of(docs, tmp_path), seq_len=8, doc_masking=False)[0]
    assert item["position_ids"].tolist() == list(range(8))


def test_loss_mask_channel_hides_targets(tmp_path):
    docs = [[1, 10, 11, 12, 2]]
    mask = [[0, 0, 0, 1, 1]]  # train only on the last real token and EOS
    item = PackedShards(shard_of(docs, tmp_path, mask), seq_len=8)[0]
    assert item["labels"].tolist()[:5] == [IGNORE, IGNORE, 12, 2, IGNORE]


def test_assemble_pads_with_own_positions():
    p = pack(np.array([3]), 6, "bestfit")
    out = assemble(np.array([1, 5, 2]), np.array([0]), np.array([3]), p, 0, 6, 0, True)
    assert out["position_ids"].tolist() == [0, 1, 2, 0, 1, 2]


def test_a_tokens_logits_do_not_depend_on_the_documents_packed_with_it():
    """Document masking reaches attention: doc B's logits are the same whether it is packed
    after doc A or alone."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      use_cache=False)  # as in training: masks come from positions only then
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    a, b = torch.randint(3, 64, (1, 7)), torch.randint(3, 64, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions).logits[:, 7:]
        alone = model(input_ids=b, position_ids=torch.arange(5).unsqueeze(0)).logits
        leaky = model(input_ids=packed, position_ids=torch.arange(12).unsqueeze(0)).logits[:, 7:]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # without masking, A leaks into B


def test_write_shards_round_trip(tmp_path):
    write_shards([[1, 2, 3], [4, 5]], tmp_path, 512, "fp")
    s = ShardSet(tmp_path).shards[0]
    assert s.tokens.tolist() == [1, 2, 3, 4, 5] and s.doc_ends.tolist() == [3, 5]
