"""pi0 and pi0.5 as vlakit builds them: counts on the meta device, the layout of what is
built, sampling options, saving, and the model-side bad inputs (numbers against the
published algorithm are in test_pi0_parity.py)."""

import functools

import pytest
import torch
from test_pi0_parity import ADIM, CHUNK, MAX_DIM, STATE_DIM, _inputs, _tiny

from vlakit import VLA, count_parameters
from vlakit.core import TokenRole
from vlakit.decoders import (
    AdaptiveRMSNorm,
    FinalAdaptiveRMSNorm,
    KeyValueLayer,
    check_expert,
    gemma_300m_stack,
    gemma_stack,
)
from vlakit.heads import ActionHead, Pi0Head, Pi05Head, Sampling
from vlakit.models import pi0, pi0_3b, pi0_decoder, pi0_expert, pi05, pi05_3b
from vlakit.projectors import LinearProjector
from vlakit.vision import vit

# -- full size, on the meta device ------------------------------------------------------------


def test_pi0_3b_builds_exactly_what_the_forward_reads():
    model = pi0_3b(device="meta")
    assert count_parameters(model) == 3_128_992_528
    parts = {name: count_parameters(child) for name, child in model.named_children()}
    assert parts["encoder"] == 412_442_352 and parts["projector"] == 2_361_344
    assert parts["decoder"] == 2_399_475_712  # embedding, 17 layers, layer 17's norm and K/V
    expert = model.head.expert
    assert count_parameters(expert) == 311_464_960
    assert parts["head"] - count_parameters(expert) == 3_248_160
    last = model.decoder.layers[17]
    assert isinstance(last, KeyValueLayer) and count_parameters(last) == 1_050_624
    assert isinstance(model.decoder.norm, torch.nn.Identity)
    keys = set(model.decoder.state_dict())
    assert {"layers.17.attn_norm.weight", "layers.17.attn.k_proj.weight",
            "layers.17.attn.v_proj.weight"} <= keys
    assert not any(k.startswith(("layers.17.attn.q_proj", "layers.17.mlp", "norm.", "lm_head"))
                   for k in keys)
    # the expert is gemma_300m_stack's layout, key for key
    with torch.device("meta"):
        reference = gemma_300m_stack()
    assert {k: v.shape for k, v in expert.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    # openpi's layout: the last layer whole and the final norm (109,056,000 more)
    assert count_parameters(pi0_3b(device="meta", last_layer_kv_only=False)) == 3_238_048_528
    assert isinstance(model.head, ActionHead) and model.head.num_action_tokens == 51


def test_pi05_3b_counts_with_and_without_the_final_gate():
    model = pi05_3b(device="meta")
    assert count_parameters(model) == 3_243_328_272
    expert = model.head.expert
    assert count_parameters(expert) == 426_883_072
    assert isinstance(expert.norm, FinalAdaptiveRMSNorm)
    assert expert.norm.dense.weight.shape == (2048, 1024)
    assert all(isinstance(n, AdaptiveRMSNorm) for layer in expert.layers
               for n in (layer.attn_norm, layer.mlp_norm))
    assert count_parameters(model.head) - count_parameters(expert) == 2_165_792
    kept = pi05_3b(device="meta", keep_final_gate=True)
    assert count_parameters(kept) == 3_244_377_872
    assert count_parameters(kept.head.expert) == 427_932_672  # gemma_300m + adaptive norms
    openpi = pi05_3b(device="meta", last_layer_kv_only=False, keep_final_gate=True)
    assert count_parameters(openpi) == 3_353_433_872
    assert model.head.num_action_tokens == 50 and model.head.prompt_length == 200


def test_full_size_knobs_are_keywords():
    model = pi0_3b(7, chunk_size=10, num_steps=5, max_dim=16, prompt_length=64, num_views=3,
                   dtype=torch.bfloat16, device="meta")
    head = model.head
    assert (head.action_dim, head.chunk_size, head.num_steps, head.max_dim) == (7, 10, 5, 16)
    assert head.prompt_length == 64 and model.num_views == 3
    assert head.action_in_proj.weight.shape == (1024, 16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.interleaver.position_offset == 0  # positions from 0: cumsum(valid) - 1


# -- tiny: sampling, saving --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_samples_share_one_prefix_and_generators_make_batching_invisible(variant):
    model = _tiny(variant)
    inputs = _inputs(with_state=variant == "pi0")
    noise = torch.randn(3, 2, CHUNK, MAX_DIM)
    both = model.predict_action(inputs, Sampling(num_samples=2, noise=noise))
    assert both.shape == (3, 2, CHUNK, ADIM)
    for j in range(2):
        one = model.predict_action(inputs, Sampling(noise=noise[:, j].contiguous()))
        torch.testing.assert_close(both[:, j], one, rtol=1e-5, atol=1e-6)
    gens = tuple(torch.Generator().manual_seed(s) for s in (1, 2, 3))
    batch = model.predict_action(inputs, Sampling(generator=gens))
    alone = model.predict_action(inputs.rows([1]), Sampling(generator=torch.Generator()
                                                            .manual_seed(2)))
    # row 1 alone has no prompt padding; in the batch it has: the same actions
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-6)
    same = model.predict_action(inputs, Sampling(generator=torch.Generator().manual_seed(0)))
    again = model.predict_action(inputs, Sampling(generator=torch.Generator().manual_seed(0)))
    assert torch.equal(same, again)


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_training_draws_come_from_the_sampling_argument(variant):
    model = _tiny(variant)
    inputs = _inputs(with_state=variant == "pi0", actions=True)
    first = model(inputs, sampling=Sampling(generator=torch.Generator().manual_seed(3))).loss
    second = model(inputs, sampling=Sampling(generator=torch.Generator().manual_seed(3))).loss
    assert torch.equal(first, second) and torch.isfinite(first)
    out = model(inputs)  # torch's global random state, as the references draw
    assert out.sequence.role_mask(TokenRole.ACTION).sum() == 0  # the prefix: last pass
    with pytest.raises(ValueError, match="Sampling.time must be"):
        model(inputs, sampling=Sampling(time=torch.rand(2)))


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_a_tiny_model_saves_and_loads_back(variant, tmp_path):
    model = _tiny(variant)
    inputs = _inputs(with_state=variant == "pi0")
    noise = torch.randn(3, CHUNK, MAX_DIM)
    loaded = VLA.from_pretrained(model.save_pretrained(tmp_path / variant))
    assert type(loaded.head) is type(model.head)
    assert isinstance(loaded.decoder.layers[-1], KeyValueLayer)
    torch.testing.assert_close(loaded.predict_action(inputs, Sampling(noise=noise)),
                               model.predict_action(inputs, Sampling(noise=noise)),
                               rtol=0, atol=0)


# -- bad input ---------------------------------------------------------------------------------


def test_state_wider_than_max_dim_or_missing_is_refused():
    model = _tiny("pi0")
    inputs = _inputs(with_state=True)
    inputs.proprio = torch.randn(3, MAX_DIM + 1)
    with pytest.raises(ValueError, match=rf"shape \(3, {MAX_DIM + 1}\).*max_dim={MAX_DIM}"):
        model.predict_action(inputs)
    with pytest.raises(ValueError, match="inputs.proprio is None"):
        model.predict_action(_inputs(with_state=False))
    pi05_model = _tiny("pi05")  # pi0.5 reads the state in the prompt, not as a token
    with pytest.raises(ValueError, match="proprio_projector"):
        pi05_model.predict_action(_inputs(with_state=True))


def test_actions_wider_than_max_dim_are_refused():
    expert = pi0_expert(dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                        mlp_dim=32)
    with pytest.raises(ValueError, match="action_dim=33 does not fit in max_dim=32"):
        Pi0Head(expert, action_dim=33)
    model = _tiny("pi0")
    inputs = _inputs(with_state=True, actions=True)
    inputs.actions = torch.randn(3, CHUNK, MAX_DIM + 2)
    with pytest.raises(ValueError, match=rf"action_dim={ADIM}\] .*got shape \(3, {CHUNK}, 8\)"):
        model(inputs)


def test_noise_must_cover_every_padded_dim():
    model = _tiny("pi0")
    with pytest.raises(ValueError, match=rf"max_dim={MAX_DIM}.*\(3, {CHUNK}, {MAX_DIM}\)"):
        model.predict_action(_inputs(with_state=True), Sampling(noise=torch.randn(3, CHUNK, ADIM)))
    inputs = _inputs(with_state=True, actions=True)
    with pytest.raises(ValueError, match=rf"\(3, {CHUNK}, {MAX_DIM}\)"):
        model(inputs, sampling=Sampling(noise=torch.randn(3, CHUNK, ADIM)))


def _stack(**changes):
    spec = dict(dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
    return gemma_stack(**{**spec, **changes})


def _parts():
    return dict(
        encoder=vit(img_size=28, patch_size=14, dim=24, depth=1, num_heads=2, mlp_dim=48),
        projector=LinearProjector(24, 32, bias=True),
        decoder=pi0_decoder(vocab_size=64, dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            head_dim=8, mlp_dim=64),
        action_dim=ADIM, chunk_size=CHUNK, max_dim=MAX_DIM, image_token_id=64,
    )


@pytest.mark.parametrize("changes, message", [
    ({"num_kv_heads": 2, "num_heads": 2}, "layer 0 of the action expert has 2 query heads "
     "and 2 key/value heads of width 8, but the decoder's layer 0 caches 2 query heads and 1 "
     "key/value head of width 8"),
    ({"head_dim": 16}, "of width 16, but the decoder's layer 0 caches .* of width 8"),
    ({"num_layers": 3}, "the action expert has 3 layers but the decoder has 2"),
    ({"rope_base": 500.0}, r"rotary embedding \(head_dim=8, base=500.0\) differs from the "
     r"decoder's \(head_dim=8, base=10000.0\)"),
])
def test_a_mismatched_expert_geometry_names_both(changes, message):
    with pytest.raises(ValueError, match=message):
        pi0(expert=_stack(**changes), **_parts())
    model = _tiny("pi0")  # the runner checks an expert passed to run_suffix too
    prefix = model.runner(_inputs(with_state=True)).prefix()
    with pytest.raises(ValueError, match=message):
        prefix.run_suffix(torch.randn(3, 2, 16), TokenRole.ACTION, decoder=_stack(**changes))
    check_expert(model.decoder, model.head.expert)  # the matching one passes


def test_the_expert_must_suit_the_variant():
    adaptive = _stack(norm=functools.partial(AdaptiveRMSNorm, cond_dim=16))
    with pytest.raises(ValueError, match="use Pi05Head"):
        pi0(expert=adaptive, **_parts())
    with pytest.raises(ValueError, match=r"read no condition: .*pi0_expert\(cond_dim=16\)"):
        pi05(expert=_stack(), **_parts())
    with pytest.raises(ValueError, match="read a condition of width 8: build them with "
                                         "cond_dim=16"):
        Pi05Head(_stack(norm=functools.partial(AdaptiveRMSNorm, cond_dim=8)), action_dim=3)
    with pytest.raises(ValueError, match="keep_final_gate=True"):
        pi0_expert(keep_final_gate=True, device="meta")
    with pytest.raises(TypeError, match="layer stack with a width"):
        Pi0Head(torch.nn.Linear(2, 2), action_dim=3)
    assert STATE_DIM < MAX_DIM  # the tiny batches exercise the state padding
