"""The decoder joint: the protocols, the bare layer stack, the per-call condition and its
norms (pi0.5's adaptive RMSNorm, DiT's adaLN-Zero), intermediate layers, the cache classes."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vlakit.convert import decoder_from_transformers
from vlakit.core import (
    AttentionTap,
    building,
    causal_mask,
    describe,
    positions_from_valid,
    rebuild,
    segment_mask,
)
from vlakit.decoders import (
    AdaLayerNormZero,
    AdaptiveRMSNorm,
    ConditionedNorm,
    Decoder,
    DecoderStack,
    GrowingKVCache,
    HFDecoder,
    KVCache,
    LayerStack,
    PrefixKVView,
    StackOutput,
    StaticKVCache,
    SuffixKVView,
    TransformerDecoder,
    gemma,
    gemma_300m_stack,
    gemma_stack,
    llama,
    transformer_stack,
)

ATOL = 1e-5
CAPABILITIES = ("supports_layer_ranges", "supports_read_only_cache", "supports_attention_tap",
                "supports_return_layers")


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _stack(norm=None, num_layers=3, dim=32, seed=0):
    torch.manual_seed(seed)
    return gemma_stack(dim=dim, num_layers=num_layers, num_heads=4, num_kv_heads=1,
                       head_dim=8, mlp_dim=48, norm=norm)


def _randomize_dense(module, seed=1, std=0.2):
    # conditioned norms start at zero: randomise their projections so a wrong formula fails
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ConditionedNorm):
                m.dense.weight.copy_(torch.randn(m.dense.weight.shape, generator=g) * std)
                m.dense.bias.copy_(torch.randn(m.dense.bias.shape, generator=g) * std)
    return module


def _inputs(b=2, n=6, dim=32, c=16):
    valid = torch.ones(b, n, dtype=torch.bool)
    condition = torch.randn(b, c)
    return torch.randn(b, n, dim), causal_mask(valid), positions_from_valid(valid), condition


ADAPTIVE = functools.partial(AdaptiveRMSNorm, cond_dim=16)
ADALN = functools.partial(AdaLayerNormZero, cond_dim=16)


# --- the protocols ---------------------------------------------------------------------


def _tiny_hf():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager")).eval()


def test_both_decoders_satisfy_the_protocol_with_their_capabilities():
    own = llama(vocab_size=50, dim=32, num_layers=2, num_heads=4, mlp_dim=64)
    wrapped = HFDecoder(_tiny_hf())
    stack = _stack()
    assert isinstance(own, Decoder) and isinstance(own, DecoderStack)
    assert isinstance(wrapped, Decoder) and isinstance(wrapped, DecoderStack)
    assert isinstance(stack, DecoderStack) and not isinstance(stack, Decoder)  # no token ends
    assert not isinstance(torch.nn.Linear(2, 2), DecoderStack)
    for name in CAPABILITIES:  # defined on every decoder, typed booleans
        assert getattr(own, name) is True, name
        assert getattr(stack, name) is True, name
        assert getattr(wrapped, name) is False, name
    assert own.condition_dim is None and wrapped.condition_dim is None
    assert _stack(ADAPTIVE).condition_dim == 16
    assert (own.dim, own.num_layers, own.vocab_size) == (32, 2, 50)
    assert (wrapped.dim, wrapped.num_layers, wrapped.vocab_size) == (32, 2, 97)
    assert (stack.dim, stack.num_layers) == (32, 3)


def test_hf_decoder_refuses_what_its_capabilities_deny():
    wrapped = HFDecoder(_tiny_hf())
    emb, mask, pos, _ = _inputs(dim=32)
    torch.testing.assert_close(wrapped(emb, mask, pos, end_layer=2), wrapped(emb, mask, pos))
    with pytest.raises(ValueError, match="supports_layer_ranges=False.*end_layer=1"):
        wrapped(emb, mask, pos, end_layer=1)
    with pytest.raises(ValueError, match="supports_attention_tap=False"):
        wrapped(emb, mask, pos, tap=AttentionTap(layer=0, queries=torch.zeros(2, 1).long()))
    with pytest.raises(ValueError, match="supports_return_layers=False"):
        wrapped(emb, mask, pos, return_layers=(0,))
    with pytest.raises(ValueError, match=r"read no condition.*\(2, 16\)"):
        wrapped(emb, mask, pos, condition=torch.randn(2, 16))
    cache = wrapped.new_cache()
    assert not cache.is_preallocated and not cache.is_read_only
    for derive in (cache.read_only, lambda: cache.suffix_view(3), lambda: cache.expand_batch(2)):
        with pytest.raises(RuntimeError, match="read-only prefix"):
            derive()


# --- the stack alone -------------------------------------------------------------------


def test_stack_state_dict_is_the_decoders_layers_and_norm_and_loads_strictly():
    dec = gemma(vocab_size=60, dim=32, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=8,
                mlp_dim=48)
    stack = _stack(seed=5)
    keys = list(stack.state_dict())
    assert all(k.startswith(("layers.", "norm.")) for k in keys)
    assert "norm.weight" in keys and "layers.2.mlp.down_proj.weight" in keys
    # the decoder keeps its names (and their order): the embedding, the stack's, the head
    own = list(dec.state_dict())
    assert own[0] == "embed.weight" and own[1:] == keys  # tied: no lm_head.weight
    assert isinstance(dec, LayerStack)  # one layer loop: the decoder is a stack with ends
    only_stack = {k: v for k, v in dec.state_dict().items() if k.startswith(("layers.", "norm."))}
    result = stack.load_state_dict(only_stack, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="embed.weight"):
        stack.load_state_dict(dec.state_dict(), strict=True)
    emb, mask, pos, _ = _inputs()
    torch.testing.assert_close(stack(emb, mask, pos), dec(emb, mask, pos), atol=0, rtol=0)


def test_decoder_keys_and_counts_are_unchanged_by_the_stack():
    dec = llama(vocab_size=50, dim=32, num_layers=2, num_heads=4, mlp_dim=64)
    per_layer = [
        "attn_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
        "attn.o_proj.weight", "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    assert list(dec.state_dict()) == (
        ["embed.weight"] + [f"layers.{i}.{k}" for i in range(2) for k in per_layer]
        + ["norm.weight", "lm_head.weight"])
    assert _count(dec) == 50 * 32 * 2 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32


def test_pi0_action_expert_counts_on_meta():
    with torch.device("meta"):
        pi0 = gemma_300m_stack()
        pi05 = gemma_300m_stack(norm=functools.partial(AdaptiveRMSNorm, cond_dim=1024))
    assert _count(pi0) == 311_464_960
    assert _count(pi0.layers[0]) == 17_303_552
    assert not hasattr(pi0, "embed") and not hasattr(pi0, "lm_head")
    assert pi0.condition_dim is None
    assert _count(pi05) == 427_932_672
    norms = [m for m in pi05.modules() if isinstance(m, AdaptiveRMSNorm)]
    assert len(norms) == 37
    assert all(_count(n) == 1024 * 3072 + 3072 and n.dense.bias is not None for n in norms)
    assert pi05.condition_dim == 1024
    # the expert attends to Gemma-2B's cache: same layers, kv heads and head width
    attn = pi0.layers[0].attn
    assert (pi0.num_layers, attn.num_kv_heads, attn.head_dim) == (18, 1, 256)


def test_stacks_with_conditioned_norms_describe_and_rebuild():
    for norm in (ADAPTIVE, ADALN, None):
        stack = _randomize_dense(_stack(norm))
        again = rebuild(json.loads(json.dumps(describe(stack))))
        assert type(again) is LayerStack
        again.load_state_dict(stack.state_dict(), strict=True)
        emb, mask, pos, c = _inputs()
        kw = {} if norm is None else {"condition": c}
        torch.testing.assert_close(again(emb, mask, pos, **kw), stack(emb, mask, pos, **kw))
    with building(None, "meta"):
        meta = rebuild(describe(gemma_300m_stack(
            norm=functools.partial(AdaptiveRMSNorm, cond_dim=1024), device="meta")))
    assert _count(meta) == 427_932_672


def test_an_expert_stack_runs_a_suffix_against_the_vlm_cache():
    """An expert reads the prefix keys its VLM wrote, layer by layer: an expert holding the
    VLM's own layers gives exactly the VLM's full pass on the suffix."""
    vlm = gemma(vocab_size=60, dim=32, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=8,
                mlp_dim=48).eval()
    expert = _stack(seed=9).eval()
    expert.load_state_dict(
        {k: v for k, v in vlm.state_dict().items() if not k.startswith("embed.")}, strict=True)
    b, n, m = 2, 7, 4
    valid = torch.ones(b, n + m, dtype=torch.bool)
    valid[1, :2] = False
    mask = segment_mask(torch.tensor([0] * n + [1] * m).expand(b, -1), valid)
    pos = positions_from_valid(valid)
    prefix, suffix = torch.randn(b, n, 32), torch.randn(b, m, 32)
    with torch.no_grad():
        cache = vlm.new_cache()
        vlm(prefix, mask[:, :n, :n], pos[:, :n], cache)
        full = vlm(torch.cat((prefix, suffix), 1), mask, pos)[:, n:]
        for view in (cache.read_only(), cache.suffix_view(m)):
            got = expert(suffix, mask[:, n:], pos[:, n:], view)
            torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="cache serves 3 layers but this LayerStack has 2"):
        _stack(num_layers=2)(suffix, mask[:, n:], pos[:, n:], cache.read_only())


# --- conditioned norms: the published formulas -------------------------------------------


def _adaptive_rms_reference(x, condition, weight, bias, eps=1e-6):
    """pi0.5 (openpi gemma.py RMSNorm with cond; LeRobot PiGemmaRMSNorm): variance and the
    modulation in float32, scale/shift/gate in that order, cast back at the end."""
    modulation = F.linear(condition.to(x.dtype), weight, bias)
    if modulation.ndim == 2:
        modulation = modulation[:, None, :]
    d = x.shape[-1]
    scale, shift, gate = modulation[..., :d], modulation[..., d : 2 * d], modulation[..., 2 * d :]
    var = x.float().pow(2).mean(-1, keepdim=True)
    normed = x.float() * torch.rsqrt(var + eps)
    return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def _adaln_zero_reference(x, condition, weight, bias, eps=1e-6):
    """DiT (models.py DiTBlock): SiLU -> Linear, chunks shift, scale, gate;
    modulate(LayerNorm(x, no affine), shift, scale) = x * (1 + scale) + shift."""
    modulation = F.linear(F.silu(condition.to(x.dtype)), weight, bias)[:, None, :]
    d = x.shape[-1]
    shift, scale, gate = modulation[..., :d], modulation[..., d : 2 * d], modulation[..., 2 * d :]
    return F.layer_norm(x, (d,), eps=eps) * (1 + scale) + shift, gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaptive_rms_norm_matches_the_published_formula(dtype):
    norm = _randomize_dense(AdaptiveRMSNorm(32, cond_dim=16)).to(dtype)
    assert not hasattr(norm, "weight")  # no learned scale vector when adaptive
    x, c = (torch.randn(2, 5, 32) * 3).to(dtype), torch.randn(2, 16)
    y, gate = norm(x, c)
    want_y, want_gate = _adaptive_rms_reference(x, c, norm.dense.weight, norm.dense.bias)
    assert y.dtype == gate.dtype == dtype and gate.shape == (2, 1, 32)
    assert torch.equal(y, want_y) and torch.equal(gate, want_gate)
    # a condition per token: [b, q, c]; a row-constant one equals the per-row form
    y_tok, gate_tok = norm(x, c[:, None].expand(2, 5, 16))
    assert gate_tok.shape == (2, 5, 32)
    tol = {"atol": 1e-5, "rtol": 0} if dtype == torch.float32 else {}  # another matmul shape
    torch.testing.assert_close(y_tok, y, **tol)
    torch.testing.assert_close(gate_tok, gate.expand(2, 5, 32), **tol)


def test_adaln_zero_matches_dit():
    norm = _randomize_dense(AdaLayerNormZero(32, cond_dim=16))
    x, c = torch.randn(2, 5, 32) * 3 + 1, torch.randn(2, 16)
    y, gate = norm(x, c)
    want_y, want_gate = _adaln_zero_reference(x, c, norm.dense.weight, norm.dense.bias)
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=0)
    torch.testing.assert_close(gate, want_gate, atol=0, rtol=0)
    plain = AdaLayerNormZero(32, cond_dim=16, activation=torch.nn.Identity())
    plain.load_state_dict(norm.state_dict())
    assert not torch.allclose(plain(x, c)[0], y)  # DiT's SiLU is applied (and can be dropped)


def test_a_dit_block_is_a_decoder_layer_with_adaln_zero_norms():
    """DiT's one Linear(c, 6d) per block = the attention norm's dense (rows :3d) and the MLP
    norm's (rows 3d:); its block formula then equals the layer's gated residuals."""
    stack = _randomize_dense(_stack(ADALN, num_layers=1))
    layer = stack.layers[0]
    six = torch.cat((layer.attn_norm.dense.weight, layer.mlp_norm.dense.weight))  # [6d, c]
    six_b = torch.cat((layer.attn_norm.dense.bias, layer.mlp_norm.dense.bias))
    x, mask, pos, c = _inputs()
    cos, sin = stack.rope(pos, x.dtype)
    s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = (
        F.linear(F.silu(c), six, six_b)[:, None].chunk(6, dim=-1))

    def modulate(h, shift, scale):
        return h * (1 + scale) + shift

    want = x + g_msa * layer.attn(modulate(F.layer_norm(x, (32,), eps=1e-6), s_msa, sc_msa),
                                  cos, sin, mask)
    want = want + g_mlp * layer.mlp(modulate(F.layer_norm(want, (32,), eps=1e-6), s_mlp, sc_mlp))
    torch.testing.assert_close(layer(x, cos, sin, mask, condition=c), want, atol=1e-5, rtol=0)


def test_the_condition_reaches_every_norm_and_gates_every_residual():
    stack = _randomize_dense(_stack(ADAPTIVE))
    x, mask, pos, c = _inputs()
    seen = []
    for name, m in stack.named_modules():
        if isinstance(m, ConditionedNorm):
            m.register_forward_hook(
                lambda mod, args, out, name=name: seen.append((name, args[1] is not None)))
    got = stack(x, mask, pos, condition=c)
    assert sorted(seen) == sorted(
        [(f"layers.{i}.{n}", True) for i in range(3) for n in ("attn_norm", "mlp_norm")]
        + [("norm", True)])
    # by hand from the published formulas: gated residuals, the final norm's gate unused
    cos, sin = stack.rope(pos, x.dtype)
    h = x
    for layer in stack.layers:
        y, gate = _adaptive_rms_reference(h, c, layer.attn_norm.dense.weight,
                                          layer.attn_norm.dense.bias)
        h = h + layer.attn(y, cos, sin, mask) * gate
        y, gate = _adaptive_rms_reference(h, c, layer.mlp_norm.dense.weight,
                                          layer.mlp_norm.dense.bias)
        h = h + layer.mlp(y) * gate
    want, _ = _adaptive_rms_reference(h, c, stack.norm.dense.weight, stack.norm.dense.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(stack(x, mask, pos, condition=c + 1), got)
    # one condition per token
    per_token = stack(x, mask, pos, condition=c[:, None].expand(2, 6, 16))
    torch.testing.assert_close(per_token, got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm, reference", [
    (ADAPTIVE, lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
    (ADALN, lambda x: F.layer_norm(x, (32,), eps=1e-6)),
], ids=["adaptive_rms", "adaln_zero"])
def test_a_fresh_conditioned_stack_is_the_identity_then_the_bare_final_norm(norm, reference):
    """Zero-initialised projections: scale = shift = gate = 0, so every gated residual adds
    nothing and the stack returns the final norm of its input, without a learned scale."""
    stack = _stack(norm)
    for m in stack.modules():
        if isinstance(m, ConditionedNorm):
            assert not m.dense.weight.any() and not m.dense.bias.any()
    x, mask, pos, c = _inputs()
    y, gate = stack.layers[0].attn_norm(x, c)
    assert not gate.any()
    torch.testing.assert_close(y, reference(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(stack(x, mask, pos, condition=c), reference(x), atol=1e-6, rtol=0)


def test_conditioning_is_checked_nothing_silently_ignored():
    adaptive, plain = _stack(ADAPTIVE), _stack()
    x, mask, pos, c = _inputs()
    with pytest.raises(ValueError, match=r"AdaptiveRMSNorm\) read a per-call condition of "
                                         r"width 16, but condition= is missing"):
        adaptive(x, mask, pos)
    with pytest.raises(ValueError, match=r"a condition \(2, 16\) was given, but none of this "
                                         r"LayerStack's norms reads one"):
        plain(x, mask, pos, condition=c)
    with pytest.raises(ValueError, match="condition has width 8, but the stack's norms read "
                                         "width 16"):
        adaptive(x, mask, pos, condition=torch.randn(2, 8))
    # a wrong batch or token count: the runtime shape check (on in the tests) names the
    # parameter; without it the stack's own check names the shapes
    with pytest.raises(TypeError, match="parameter 'condition'"):
        adaptive(x, mask, pos, condition=torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"condition is \(3, 16\), but the embeddings are "
                                         r"\[batch=2, tokens=6\]"):
        adaptive._check_condition(x, torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"condition is \(2, 5, 16\).*tokens=6"):
        adaptive._check_condition(x, torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"got 4 dimensions \(2, 6, 1, 16\)"):
        adaptive._check_condition(x, torch.randn(2, 6, 1, 16))
    widths = iter([16, 16, 8])  # layer 0's two norms, then the final norm

    def mixed(dim):
        return AdaptiveRMSNorm(dim, cond_dim=next(widths))

    with pytest.raises(ValueError, match=r"different widths \[8, 16\]"):
        gemma_stack(dim=32, num_layers=1, num_heads=4, num_kv_heads=1, head_dim=8, mlp_dim=8,
                    norm=mixed)
    # the layer on its own refuses as well
    cos, sin = plain.rope(pos, x.dtype)
    with pytest.raises(ValueError, match="read none"):
        plain.layers[0](x, cos, sin, mask, condition=c)
    with pytest.raises(ValueError, match=r"\) read a per-call condition of width 16, but none"):
        adaptive.layers[0](x, cos, sin, mask)


def test_a_conditioned_stack_serves_suffixes_from_a_read_only_prefix():
    stack = _randomize_dense(_stack(ADAPTIVE)).eval()
    b, n, m = 2, 5, 3
    valid = torch.ones(b, n + m, dtype=torch.bool)
    mask = segment_mask(torch.tensor([0] * n + [1] * m).expand(b, -1), valid)
    pos = positions_from_valid(valid)
    x, c = torch.randn(b, n + m, 32), torch.randn(b, 16)
    with torch.no_grad():
        full = stack(x, mask, pos, condition=c)
        cache = stack.new_cache()
        stack(x[:, :n], mask[:, :n, :n], pos[:, :n], cache, condition=c)
        for view in (cache.read_only(), cache.suffix_view(m)):
            got = stack(x[:, n:], mask[:, n:], pos[:, n:], view, condition=c)
            torch.testing.assert_close(got, full[:, n:], atol=ATOL, rtol=0)


# --- intermediate layers -----------------------------------------------------------------


def test_return_layers_are_each_layers_output_before_the_final_norm():
    dec = llama(vocab_size=50, dim=32, num_layers=4, num_heads=4, mlp_dim=64)
    x, mask, pos, _ = _inputs()
    out = dec(x, mask, pos, return_layers=(1, 3))
    assert isinstance(out, StackOutput)
    hidden, layers = out
    assert set(layers) == {1, 3}
    torch.testing.assert_close(hidden, dec(x, mask, pos), atol=0, rtol=0)
    # by hand: layer i's output is what a range ending after layer i returns
    torch.testing.assert_close(layers[1], dec(x, mask, pos, end_layer=2), atol=0, rtol=0)
    h3 = dec(x, mask, pos, end_layer=3)
    cos, sin = dec.rope(pos, x.dtype)
    torch.testing.assert_close(layers[3], dec.layers[3](h3, cos, sin, mask), atol=0, rtol=0)
    torch.testing.assert_close(dec.norm(layers[3]), hidden, atol=0, rtol=0)
    # inside a range, with a cache
    cache = dec.new_cache()
    part, kept = dec(x, mask, pos, cache, start_layer=1, end_layer=3, return_layers=[2])
    torch.testing.assert_close(kept[2], part)
    assert dec(x, mask, pos, return_layers=()).layers == {}


def test_return_layers_are_transformers_hidden_states():
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager")).eval()
    ours = decoder_from_transformers(hf).eval()
    ids = torch.randint(0, 97, (2, 7))
    valid = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        states = hf.model(input_ids=ids, output_hidden_states=True).hidden_states
        _, layers = ours(ours.embed_tokens(ids), causal_mask(valid), positions_from_valid(valid),
                         return_layers=(0, 1))
    for i in (0, 1):
        torch.testing.assert_close(layers[i], states[i + 1], atol=ATOL, rtol=0)


def test_bad_return_layers_name_the_valid_range():
    dec = llama(vocab_size=50, dim=32, num_layers=4, num_heads=4, mlp_dim=64)
    x, mask, pos, _ = _inputs()
    with pytest.raises(ValueError, match=r"layer 4, but this call runs layers \[0, 4\).*"
                                         r"valid: 0..3"):
        dec(x, mask, pos, return_layers=(1, 4))
    with pytest.raises(ValueError, match=r"layer -1.*valid: 0..3"):
        dec(x, mask, pos, return_layers=(-1,))
    with pytest.raises(ValueError, match=r"layer 0, but this call runs layers \[2, 4\)"):
        dec(x, mask, pos, start_layer=2, return_layers=(0,))
    with pytest.raises(TypeError, match="parameter 'return_layers'"):  # the shape check's
        dec(x, mask, pos, return_layers=2)
    with pytest.raises(TypeError, match="sequence of layer indices such as"):  # the stack's
        dec._check_return_layers(2, 0, 4)


# --- the cache classes -------------------------------------------------------------------


def test_one_cache_class_per_mode():
    stack = _stack()
    grown, fixed = stack.new_cache(), stack.new_cache(max_len=9)
    assert type(grown) is GrowingKVCache and type(fixed) is StaticKVCache
    assert all(isinstance(c, KVCache) for c in (grown, fixed))
    assert not grown.is_preallocated and fixed.is_preallocated
    x, mask, pos, _ = _inputs()
    stack(x, mask, pos, grown)
    stack(x, mask, pos, fixed)
    views = grown.read_only(), fixed.read_only(), grown.expand_batch(2), fixed.suffix_view(3)
    assert [type(v) for v in views] == [PrefixKVView, PrefixKVView, PrefixKVView, SuffixKVView]
    for view in views:
        assert view.is_read_only and not view.is_preallocated and len(view) == 6
        assert view.key_length(2) == 8
        view.advance(4)  # a view never counts what it does not store
        assert len(view) == 6
    assert views[2].keys[0].shape[0] == 4 and views[3].keys[0].shape[-2] == 9
    assert len(fixed.read_only().read_only()) == 6  # a view of a view
    with pytest.raises(TypeError, match=r"GrowingKVCache\(num_layers\).*StaticKVCache"):
        KVCache(2)
    with pytest.raises(ValueError, match="max_len >= 1"):
        StaticKVCache(2, 0)
    with pytest.raises(ValueError, match="suffix_slots must be >= 1"):
        grown.suffix_view(0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        grown.expand_batch(0)


def test_suffix_view_writes_in_place_and_matches_concatenation():
    """The reserved-slot view never copies the prefix per step: the same buffer every step,
    and the same keys as the concatenating read-only view (moved here from
    test_continuous_heads.py with the cache classes, every assertion kept)."""
    cache = GrowingKVCache(1)
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    cache.update(0, k, v)
    cache.advance(5)
    view = cache.suffix_view(3, repeats=2)
    buffer = view.keys[0]
    assert buffer.shape == (4, 2, 8, 4)
    plain = cache.expand_batch(2)
    for _ in range(3):
        sk, sv = torch.randn(4, 2, 3, 4), torch.randn(4, 2, 3, 4)
        with torch.no_grad():
            got_k, got_v = view.update(0, sk, sv)
        want_k, want_v = plain.update(0, sk, sv)
        assert got_k.data_ptr() == buffer.data_ptr()
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert view.keys[0] is buffer and torch.equal(cache.keys[0], k)  # the prefix untouched
    with pytest.raises(ValueError, match="cache batch size is 4 but the new tokens have batch 2"):
        view.update(0, k[:, :, :3], v[:, :, :3])


# --- compile -----------------------------------------------------------------------------

_COMPILE = r"""
import functools, torch
from vlakit.core import causal_mask, positions_from_valid
from vlakit.decoders import AdaptiveRMSNorm, gemma_stack
stack = gemma_stack(dim=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8, mlp_dim=48,
                    norm=functools.partial(AdaptiveRMSNorm, cond_dim=16))
for m in stack.modules():
    if isinstance(m, AdaptiveRMSNorm):
        torch.nn.init.normal_(m.dense.weight, std=0.1)
valid = torch.ones(2, 6, dtype=torch.bool)
x, c = torch.randn(2, 6, 32), torch.randn(2, 16)
mask, pos = causal_mask(valid), positions_from_valid(valid)
run = lambda x, c: stack(x, mask, pos, condition=c, return_layers=(0,))
eager = run(x, c)
got = torch.compile(run, backend="aot_eager", fullgraph=True)(x, c)
torch.testing.assert_close(got.hidden, eager.hidden)
torch.testing.assert_close(got.layers[0], eager.layers[0])
print("STACK COMPILE OK")
"""


def test_a_conditioned_stack_with_return_layers_compiles_without_graph_breaks():
    env = {k: v for k, v in os.environ.items() if k != "VLAKIT_TYPECHECK"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0 and "STACK COMPILE OK" in done.stdout, done.stderr[-3000:]


def test_transformer_decoder_forward_signature_is_kept():
    import inspect

    params = inspect.signature(TransformerDecoder.forward).parameters
    assert list(params)[:8] == ["self", "embeds", "mask", "positions", "cache", "start_layer",
                                "end_layer", "tap"]
    assert params["condition"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["return_layers"].kind is inspect.Parameter.KEYWORD_ONLY
    assert transformer_stack  # the component builder is public
