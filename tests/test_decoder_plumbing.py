"""Decoder plumbing: mask specs and the causal fast path, layer ranges, preallocated
caches, the tied LM head as a module."""

import pytest
import torch
from _tiny import VOCAB_SIZE

from vlakit.core import (
    BidirectionalMask,
    CausalMask,
    MaskSpec,
    PrefixLMMask,
    RoleBlockMask,
    TokenRole,
    TokenSequence,
    bidirectional_mask,
    causal_mask,
    positions_from_valid,
    prefix_lm_mask,
)
from vlakit.decoders import GrowingKVCache, TiedLMHead, gemma, llama


def _decoder(tied=False):
    torch.manual_seed(0)
    return llama(vocab_size=VOCAB_SIZE, dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, tie_embeddings=tied)


def _seq(valid, right_padded=True, suffix_from=4):
    b, n = valid.shape
    roles = torch.full((b, n), int(TokenRole.TEXT))
    roles[:, 1] = int(TokenRole.IMAGE)
    return TokenSequence(
        embeds=torch.randn(b, n, 32), roles=torch.where(valid, roles, 0),
        positions=positions_from_valid(valid), valid=valid,
        is_suffix=(torch.arange(n) >= suffix_from).expand(b, n) & valid,
        token_ids=torch.zeros(b, n, dtype=torch.long), right_padded=right_padded,
    )


VALID = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)


def test_policy_specs_give_the_documented_dense_masks():
    seq = _seq(VALID)
    assert torch.equal(CausalMask()(seq), causal_mask(VALID))
    assert torch.equal(BidirectionalMask()(seq), bidirectional_mask(VALID))
    assert torch.equal(PrefixLMMask()(seq), prefix_lm_mask(seq.is_suffix, VALID))
    blocks = RoleBlockMask([{TokenRole.IMAGE}, {TokenRole.TEXT}])(seq)
    assert blocks[0, 1, 1] and not blocks[0, 1, 2] and blocks[0, 2, 1]
    assert CausalMask().spec(seq).is_causal
    assert not CausalMask().spec(_seq(VALID, right_padded=False)).is_causal
    assert not PrefixLMMask().spec(seq).is_causal


def test_causal_fast_path_equals_the_dense_mask_at_real_tokens():
    dec = _decoder()
    seq = _seq(VALID)
    spec = CausalMask().spec(seq)
    assert spec.is_causal
    fast = dec(seq.embeds, spec, seq.positions)
    dense = dec(seq.embeds, causal_mask(VALID), seq.positions)
    torch.testing.assert_close(fast[VALID], dense[VALID], rtol=1e-5, atol=1e-6)
    # a spec that is not causal goes through its dense mask
    spec = PrefixLMMask().spec(seq)
    torch.testing.assert_close(dec(seq.embeds, spec, seq.positions),
                               dec(seq.embeds, spec.dense(), seq.positions))


def test_mask_spec_must_cover_the_embeddings():
    dec = _decoder()
    spec = MaskSpec(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask \(a MaskSpec\) is \[batch=2, tokens=5\]"):
        dec(torch.randn(2, 7, 32), spec, torch.zeros(2, 7, dtype=torch.long))


def test_running_a_range_of_layers_composes_to_the_full_forward():
    dec = _decoder()
    seq = _seq(VALID)
    mask = causal_mask(VALID)
    full = dec(seq.embeds, mask, seq.positions)
    h = dec(seq.embeds, mask, seq.positions, end_layer=1)  # no final norm yet
    assert not torch.allclose(h, full)
    torch.testing.assert_close(dec(h, mask, seq.positions, start_layer=1), full)
    with pytest.raises(ValueError, match=r"layer range \[2, 5\) is not inside the decoder's 3"):
        dec(seq.embeds, mask, seq.positions, start_layer=2, end_layer=5)


@pytest.mark.parametrize("build", [_decoder, lambda: gemma(
    vocab_size=VOCAB_SIZE, dim=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
    mlp_dim=64)])
def test_preallocated_cache_equals_the_appending_cache(build):
    dec = build()
    valid = torch.ones(2, 5, dtype=torch.bool)
    embeds, pos = torch.randn(2, 5, 32), positions_from_valid(valid)
    grown, fixed = dec.new_cache(), dec.new_cache(max_len=8)
    a = dec(embeds, causal_mask(valid), pos, grown)
    b = dec(embeds, causal_mask(valid), pos, fixed)  # mask padded with False to 8 keys
    torch.testing.assert_close(a, b)
    assert len(fixed) == 8 and fixed.filled() == 5 and fixed.key_length(1) == 8
    step = torch.randn(2, 1, 32)
    keys = torch.zeros(2, 1, 8, dtype=torch.bool)
    keys[..., :6] = True
    a = dec(step, torch.ones(2, 1, 6, dtype=torch.bool), pos[:, -1:] + 1, grown)
    b = dec(step, keys, pos[:, -1:] + 1, fixed)
    torch.testing.assert_close(a, b)
    view = fixed.read_only()
    assert len(view) == 6 and view.is_read_only


def test_layer_forward_needs_its_cache_slot():
    dec = _decoder()
    x = torch.randn(1, 2, 32)
    cos, sin = dec.rope(torch.arange(2)[None], x.dtype)
    with pytest.raises(ValueError, match="no layer_idx"):
        dec.layers[0](x, cos, sin, torch.ones(1, 2, 2, dtype=torch.bool), GrowingKVCache(3))


def test_tied_head_is_a_module_holding_the_embedding_parameter():
    dec = _decoder(tied=True)
    assert isinstance(dec.lm_head, TiedLMHead) and dec.lm_head.weight is dec.embed.weight
    assert "lm_head.weight" not in dec.state_dict()  # stored once, under the embedding
    state = {k: v.clone() for k, v in dec.state_dict().items()}
    state["lm_head.weight"] = state["embed.weight"].clone()
    dec.load_state_dict(state)  # a checkpoint that stores the tied head too loads unchanged
    state["lm_head.weight"] = torch.zeros(VOCAB_SIZE, 32)
    state["embed.weight"] = state["embed.weight"] + 1
    before = dec.embed.weight.detach().clone()
    with pytest.raises(ValueError, match="lm_head.weight differs from its embed.weight"):
        dec.load_state_dict(state)
    assert torch.equal(dec.embed.weight, before)  # refused before anything was loaded
    with torch.device("meta"):
        meta = _decoder(tied=True)
    meta.to_empty(device="cpu")
    assert meta.lm_head.weight is meta.embed.weight
    with torch.device("meta"):
        meta = _decoder(tied=True)
    del state["lm_head.weight"]
    meta.load_state_dict(state, assign=True)  # assignment replaces the embedding's Parameter
    assert meta.lm_head.weight is meta.embed.weight and not meta.embed.weight.is_meta
    h = torch.randn(2, 32)
    torch.testing.assert_close(dec.logits(h), h @ dec.embed.weight.T)


def test_replacing_validity_drops_the_right_padding_fact():
    seq = _seq(VALID)
    drop = torch.zeros_like(VALID)
    drop[:, 2] = True  # a pruner marks a middle token invalid
    pruned = seq.replace(valid=VALID & ~drop)
    assert seq.right_padded and not pruned.right_padded
    assert not CausalMask().spec(pruned).is_causal  # the dense mask keeps it exact
    assert seq.replace(embeds=seq.embeds * 2).right_padded


def test_a_forward_split_into_layer_ranges_shares_one_appending_cache():
    dec = _decoder()
    valid = torch.ones(2, 5, dtype=torch.bool)
    x, pos, mask = torch.randn(2, 5, 32), positions_from_valid(valid), causal_mask(valid)
    whole, split = dec.new_cache(), dec.new_cache()
    expected = dec(x, mask, pos, whole)
    h = dec(x, mask, pos, split, end_layer=1)
    got = dec(h, mask, pos, split, start_layer=1)
    torch.testing.assert_close(got, expected)
    assert len(split) == len(whole) == 5
    step, keys = torch.randn(2, 1, 32), torch.ones(2, 1, 6, dtype=torch.bool)
    torch.testing.assert_close(dec(step, keys, pos[:, -1:] + 1, split),
                               dec(step, keys, pos[:, -1:] + 1, whole))


def test_next_token_loss_refuses_more_targets_than_its_static_bound():
    from vlakit.heads import next_token_loss

    hidden, ids = torch.randn(1, 6, 8), torch.randint(0, 10, (1, 6))
    targets = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    head = torch.nn.Linear(8, 10)
    exact = next_token_loss(hidden, ids, targets, head)
    torch.testing.assert_close(next_token_loss(hidden, ids, targets, head, max_targets=3), exact)
    torch.testing.assert_close(next_token_loss(hidden, ids, targets, head, max_targets=5), exact)
    with pytest.raises(ValueError, match="a row has 3 target tokens but .* at most 2"):
        next_token_loss(hidden, ids, targets, head, max_targets=2)
    none = torch.zeros_like(targets)
    assert next_token_loss(hidden, ids, none, head).item() == 0.0
    assert next_token_loss(hidden, ids, none, head, max_targets=2).item() == 0.0
