import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from vlakit.convert import (
    convert_hf_decoder_state_dict,
    decoder_from_transformers,
    load_hf_decoder_state_dict,
)
from vlakit.core import causal_mask, positions_from_valid, prefix_lm_mask, segment_mask
from vlakit.decoders import (
    GrowingKVCache,
    HFDecoder,
    gemma_2b,
    greedy_generate,
    llama,
    llama2_7b,
)

ATOL = 1e-5


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "builder, kwargs, expected",
    [
        (llama2_7b, {}, 6_738_415_616),
        (llama2_7b, {"vocab_size": 32064}, 6_738_939_904),
        (gemma_2b, {}, 2_506_172_416),
        (gemma_2b, {"vocab_size": 257216}, 2_508_662_784),
    ],
)
def test_full_size_parameter_counts_on_meta(builder, kwargs, expected):
    with torch.device("meta"):
        assert _count(builder(**kwargs)) == expected


def test_llama2_7b_state_dict_shapes_match_transformers_on_meta():
    config = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
    )
    with torch.device("meta"):
        reference = LlamaForCausalLM(config)
        ours = llama2_7b(vocab_size=32064)
    converted = convert_hf_decoder_state_dict(reference.state_dict())
    own = ours.state_dict()
    assert set(converted) == set(own)
    for key, value in converted.items():
        assert value.shape == own[key].shape, key


def _tiny_llama(**overrides):
    kwargs = dict(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager",
    )
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def _tiny_gemma(**overrides):
    kwargs = dict(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        max_position_embeddings=128, attn_implementation="eager",
    )
    kwargs.update(overrides)
    return GemmaForCausalLM(GemmaConfig(**kwargs)).eval()


def _randomize_norms(model):
    # Norm weights start at 1 (Llama) or 0 (Gemma); randomise them so a wrong convention fails.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def _to_4d_additive(mask_bool):
    out = torch.zeros(mask_bool.shape, dtype=torch.float32)
    return out.masked_fill(~mask_bool, torch.finfo(torch.float32).min)[:, None]


BOTH_FAMILIES = pytest.mark.parametrize("make", [_tiny_llama, _tiny_gemma], ids=["llama", "gemma"])


@BOTH_FAMILIES
def test_causal_logits_match_transformers_with_padding(make):
    hf = _randomize_norms(make())
    ours = decoder_from_transformers(hf).eval()
    ids = torch.randint(0, 90, (2, 11))
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :3] = False  # left padding in the second row
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=valid.long()).logits
        positions = positions_from_valid(valid)
        hidden = ours(ours.embed_tokens(ids), causal_mask(valid), positions)
        logits = ours.logits(hidden)
    torch.testing.assert_close(logits[valid], expected[valid], atol=ATOL, rtol=0)


@BOTH_FAMILIES
def test_prefix_lm_logits_match_transformers(make):
    hf = _randomize_norms(make())
    ours = decoder_from_transformers(hf).eval()
    ids = torch.randint(0, 90, (2, 10))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, -2:] = False  # right padding
    is_suffix = torch.zeros(2, 10, dtype=torch.bool)
    is_suffix[0, 5:] = True
    is_suffix[1, 7:] = True
    mask = prefix_lm_mask(is_suffix, valid)
    positions = positions_from_valid(valid)
    with torch.no_grad():
        expected = hf(
            input_ids=ids, attention_mask=_to_4d_additive(mask), position_ids=positions
        ).logits
        logits = ours.logits(ours(ours.embed_tokens(ids), mask, positions))
    torch.testing.assert_close(logits[valid], expected[valid], atol=ATOL, rtol=0)
    # and the mask really matters: the same input under a causal mask differs on the prefix
    causal = ours.logits(ours(ours.embed_tokens(ids), causal_mask(valid), positions))
    assert (causal[0, :4] - logits[0, :4]).abs().max() > 1e-3


@BOTH_FAMILIES
def test_append_cache_equals_full_forward(make):
    hf = _randomize_norms(make())
    ours = decoder_from_transformers(hf).eval()
    ids = torch.randint(0, 90, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :2] = False
    mask, positions = causal_mask(valid), positions_from_valid(valid)
    with torch.no_grad():
        full = ours(ours.embed_tokens(ids), mask, positions)
        cache = ours.new_cache()
        parts = [ours(ours.embed_tokens(ids[:, :8]), mask[:, :8, :8], positions[:, :8], cache)]
        for t in range(8, 12):
            parts.append(
                ours(ours.embed_tokens(ids[:, t : t + 1]), mask[:, t : t + 1, : t + 1],
                     positions[:, t : t + 1], cache)
            )
    assert len(cache) == 12
    torch.testing.assert_close(torch.cat(parts, 1)[valid], full[valid], atol=ATOL, rtol=0)


@BOTH_FAMILIES
def test_read_only_prefix_cache_serves_many_suffixes(make):
    ours = decoder_from_transformers(_randomize_norms(make())).eval()
    b, n_prefix, n_suffix = 2, 7, 4
    prefix = torch.randn(b, n_prefix, ours.dim)
    valid = torch.ones(b, n_prefix + n_suffix, dtype=torch.bool)
    valid[1, :2] = False
    # pi0-style blocks: prefix bidirectional, suffix one block that sees everything
    seg = torch.tensor([0] * n_prefix + [1] * n_suffix).expand(b, -1)
    mask = segment_mask(seg, valid)
    positions = positions_from_valid(valid)
    with torch.no_grad():
        cache = ours.new_cache()
        ours(prefix, mask[:, :n_prefix, :n_prefix], positions[:, :n_prefix], cache)
        keys_before = [k.clone() for k in cache.keys]
        view = cache.read_only()
        for _ in range(3):
            suffix = torch.randn(b, n_suffix, ours.dim)
            got = ours(suffix, mask[:, n_prefix:], positions[:, n_prefix:], view)
            full = ours(torch.cat((prefix, suffix), 1), mask, positions)
            torch.testing.assert_close(got, full[:, n_prefix:], atol=ATOL, rtol=0)
            assert len(cache) == n_prefix and len(view) == n_prefix
    for before, after in zip(keys_before, cache.keys):
        assert torch.equal(before, after)


def test_expand_batch_shares_one_prefix():
    ours = decoder_from_transformers(_tiny_llama()).eval()
    prefix = torch.randn(1, 5, ours.dim)
    valid = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        cache = ours.new_cache()
        ours(prefix, causal_mask(valid), positions_from_valid(valid), cache)
        view = cache.expand_batch(3)
        suffix = torch.randn(3, 2, ours.dim)
        mask = torch.ones(3, 2, 7, dtype=torch.bool)
        got = ours(suffix, mask, torch.tensor([[5, 6]]).expand(3, 2), view)
        full = torch.cat((prefix.expand(3, -1, -1), suffix), 1)
        seg = torch.tensor([0, 1, 2, 3, 4, 5, 5]).expand(3, -1)
        ref = ours(full, segment_mask(seg, torch.ones(3, 7, dtype=torch.bool)),
                   torch.arange(7).expand(3, -1))
    torch.testing.assert_close(got, ref[:, 5:], atol=ATOL, rtol=0)
    assert len(cache) == 5


@BOTH_FAMILIES
def test_greedy_generation_matches_transformers_generate(make):
    hf = make()
    ours = decoder_from_transformers(hf).eval()
    ids = torch.randint(1, 90, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    ids[~valid] = 0
    with torch.no_grad():
        expected = hf.generate(
            input_ids=ids, attention_mask=valid.long(), max_new_tokens=5, do_sample=False,
            pad_token_id=0,
        )[:, 6:]
        got = greedy_generate(
            ours, ours.embed_tokens(ids), causal_mask(valid), positions_from_valid(valid),
            valid, max_new_tokens=5,
        )
    assert torch.equal(got, expected)


def test_generation_with_right_padding_equals_unpadded_rows():
    ours = decoder_from_transformers(_tiny_llama()).eval()
    a, b_ = torch.randint(1, 90, (1, 6)), torch.randint(1, 90, (1, 4))
    batch = torch.zeros(2, 6, dtype=torch.long)
    batch[0], batch[1, :4] = a[0], b_[0]
    valid = batch != 0

    def run(ids, valid):
        return greedy_generate(ours, ours.embed_tokens(ids), causal_mask(valid),
                               positions_from_valid(valid), valid, 4)

    together = run(batch, valid)
    assert torch.equal(together[0], run(a, a != 0)[0])
    assert torch.equal(together[1], run(b_, b_ != 0)[0])


def _tiny_qwen2():
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=89, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )).eval()


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_qwen2], ids=["llama", "qwen2"])
def test_hf_decoder_matches_wrapped_model_with_and_without_cache(make):
    hf = make()
    wrapped = HFDecoder(hf).eval()
    ids = torch.randint(1, 80, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :2] = False
    mask, positions = causal_mask(valid), positions_from_valid(valid)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=valid.long()).logits
        logits = wrapped.logits(wrapped(wrapped.embed_tokens(ids), mask, positions))
        torch.testing.assert_close(logits[valid], expected[valid], atol=ATOL, rtol=0)
        cache = wrapped.new_cache()
        first = wrapped(wrapped.embed_tokens(ids[:, :6]), mask[:, :6, :6], positions[:, :6], cache)
        rest = wrapped(wrapped.embed_tokens(ids[:, 6:]), mask[:, 6:], positions[:, 6:], cache)
        cached = wrapped.logits(torch.cat((first, rest), 1))
    torch.testing.assert_close(cached[valid], expected[valid], atol=ATOL, rtol=0)
    assert len(cache) == 9


def test_hf_decoder_honours_custom_prefix_lm_mask():
    hf = _tiny_llama(attn_implementation="sdpa")
    wrapped, ours = HFDecoder(hf).eval(), decoder_from_transformers(hf).eval()
    emb = torch.randn(2, 8, 64)
    valid = torch.ones(2, 8, dtype=torch.bool)
    is_suffix = torch.arange(8).expand(2, -1) >= 5
    mask, positions = prefix_lm_mask(is_suffix, valid), positions_from_valid(valid)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(emb, mask, positions), ours(emb, mask, positions),
                                   atol=ATOL, rtol=0)


def test_hf_decoder_refuses_read_only_cache_clearly():
    wrapped = HFDecoder(_tiny_qwen2())
    with pytest.raises(RuntimeError, match="read-only prefix"):
        wrapped.new_cache().read_only()
    with pytest.raises(TypeError, match="GrowingKVCache"):
        emb, valid = torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.bool)
        wrapped(emb, causal_mask(valid), positions_from_valid(valid), GrowingKVCache(2))


def test_hf_decoder_loads_from_local_directory(tmp_path):
    hf = _tiny_qwen2()
    hf.save_pretrained(tmp_path)
    wrapped = HFDecoder.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 80, (1, 5))
    valid = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        out = wrapped.logits(wrapped(wrapped.embed_tokens(ids), causal_mask(valid),
                                     positions_from_valid(valid)))
        torch.testing.assert_close(out, hf(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_gemma_embedding_scale_is_applied():
    ours = decoder_from_transformers(_tiny_gemma())
    ids = torch.tensor([[3]])
    torch.testing.assert_close(ours.embed_tokens(ids)[0, 0], ours.embed.weight[3] * 8.0)


# --- bad input ---------------------------------------------------------------------


def _small():
    return llama(vocab_size=50, dim=32, num_layers=1, num_heads=4, mlp_dim=64, max_seq_len=16)


def test_wrong_hidden_size_names_the_width():
    model, valid = _small(), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="width 48.*hidden size is 32"):
        model(torch.randn(1, 3, 48), causal_mask(valid), positions_from_valid(valid))


def test_heads_not_dividing_width_names_values():
    with pytest.raises(ValueError, match="num_heads=5.*dim=32"):
        llama(vocab_size=10, dim=32, num_layers=1, num_heads=5, mlp_dim=8)
    with pytest.raises(ValueError, match="num_kv_heads=3.*num_heads=4"):
        llama(vocab_size=10, dim=32, num_layers=1, num_heads=4, num_kv_heads=3, mlp_dim=8)


def test_mask_of_wrong_shape_names_dimension():
    model, valid = _small(), torch.ones(1, 4, dtype=torch.bool)
    bad = torch.ones(1, 4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="keys dimension is 5, expected 4"):
        model(torch.randn(1, 4, 32), bad, positions_from_valid(valid))


def test_runtime_shape_check_names_the_dimension():
    model = _small()
    import vlakit

    assert vlakit.typecheck_enabled()
    # jaxtyping + beartype name the parameter and the axis values they bound (b=2)
    with pytest.raises(TypeError, match=r"parameter 'mask'(.|\n)*b=2"):
        model(torch.randn(2, 4, 32), torch.ones(1, 4, 4, dtype=torch.bool),
              torch.zeros(2, 4, dtype=torch.long))


def test_wrong_family_in_from_transformers():
    with pytest.raises(TypeError, match="Qwen2ForCausalLM"):
        decoder_from_transformers(_tiny_qwen2())


def test_position_beyond_max_seq_len():
    model, valid = _small(), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="position 20.*max_seq_len=16"):
        model(torch.randn(1, 2, 32), causal_mask(valid), torch.tensor([[19, 20]]))


def test_mismatched_checkpoint_key_is_named():
    model = _small()
    bad = {"model.layers.0.self_attn.qq_proj.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="qq_proj"):
        load_hf_decoder_state_dict(model, bad)


def test_decoder_checkpoint_missing_and_misshaped_keys_are_named():
    from vlakit.core import CheckpointError

    hf = _tiny_llama()
    ours = decoder_from_transformers(hf)
    state = dict(hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="'layers.1.mlp.up_proj.weight'"):
        load_hf_decoder_state_dict(ours, state)
    state = {**hf.state_dict(), "model.norm.weight": torch.zeros(3)}
    with pytest.raises(KeyError, match=r"'norm.weight' has shape \(3,\)"):
        load_hf_decoder_state_dict(ours, state)


# --- builders: linear factory, conversion rules ---------------------------------------


class _RecordingLinear(torch.nn.Linear):
    """A stand-in for a LoRA / quantised linear: records every construction."""

    built: list = []

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        _RecordingLinear.built.append((in_features, out_features, bias))

    def forward(self, x):
        return super().forward(x) * 1.0


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_builders_pass_the_linear_factory_to_every_projection(family):
    from vlakit.decoders import gemma

    _RecordingLinear.built = []
    kw = dict(vocab_size=50, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=48, linear=_RecordingLinear)
    model = (llama if family == "llama" else gemma)(**kw)
    attn, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
    projections = attn + mlp
    for layer in model.layers:
        for owner, names in ((layer.attn, attn), (layer.mlp, mlp)):
            for name in names:
                assert isinstance(getattr(owner, name), _RecordingLinear), name
    assert len(_RecordingLinear.built) == 7 * 2
    assert _RecordingLinear.built[:7] == [
        (32, 32, False), (32, 16, False), (32, 16, False), (32, 32, False),
        (32, 48, False), (32, 48, False), (48, 32, False),
    ]
    assert not isinstance(model.lm_head, _RecordingLinear)  # the head stays a plain linear
    # PEFT-style name targeting still finds the usual names
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, _RecordingLinear)}
    assert names == set(projections)
    valid = torch.ones(1, 4, dtype=torch.bool)
    out = model(torch.randn(1, 4, 32), causal_mask(valid), positions_from_valid(valid))
    assert out.shape == (1, 4, 32)


def test_hf_rules_rename_a_prefixed_vla_checkpoint_and_drop_buffers():
    from vlakit.convert import HF_DECODER_RULES, rename_keys

    hf = _tiny_llama()
    state = {f"language_model.{k}": v for k, v in hf.state_dict().items()}
    state["vision_backbone.featurizer.cls_token"] = torch.zeros(1)
    state["language_model.model.rotary_emb.inv_freq"] = torch.zeros(1)
    converted = convert_hf_decoder_state_dict(state, prefix="language_model.")
    ours = decoder_from_transformers(hf)
    assert set(converted) == set(ours.state_dict())
    load_hf_decoder_state_dict(ours, state, prefix="language_model.")
    renamed = rename_keys({"model.layers.3.post_attention_layernorm.weight": torch.zeros(1)},
                          HF_DECODER_RULES, source="t")
    assert list(renamed) == ["layers.3.mlp_norm.weight"]


def test_decoder_from_transformers_keeps_the_head_tied_and_the_dtype():
    hf = _tiny_gemma().to(torch.bfloat16)
    ours = decoder_from_transformers(hf)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.tied_embeddings and ours.lm_head.weight is ours.embed.weight
    torch.testing.assert_close(ours.embed.weight, hf.model.embed_tokens.weight, atol=0, rtol=0)
