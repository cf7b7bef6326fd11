"""VLA plumbing: FiLM conditioning inside a VLA, proprio normalisation, vocabulary
checks at build time (see also test_validation.py)."""

import torch
from _tiny import ACTION_VOCAB_END, VOCAB_SIZE

from vlakit import VLA, VLAInputs
from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.core import BidirectionalMask, CausalMask, TokenRole
from vlakit.decoders import llama
from vlakit.heads import DiscreteActionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.projectors import LinearProjector, ProprioProjector
from vlakit.vision import FusedEncoder, vit

D = 64


def _inputs(ids=None, proprio=None, actions=None, channels=3):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 200, (2, 6), generator=g) if ids is None else ids
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, -2:] = False
    return VLAInputs(
        input_ids=ids,
        text_valid=valid,
        pixels=torch.randn(2, 1, channels, 28, 28, generator=g),
        proprio=proprio, actions=actions,
    )


def _film_model(fused: bool):
    torch.manual_seed(0)
    towers = [vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64)
              .add_film(D) for _ in range(2 if fused else 1)]
    encoder = FusedEncoder(towers) if fused else towers[0]
    for p in encoder.parameters():  # FiLM starts non-trivial so the condition matters
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    return VLA(
        encoder, LinearProjector(encoder.dim, D), PrefixInterleaver(bos_id=1, eos_id=2),
        llama(vocab_size=VOCAB_SIZE, dim=D, num_layers=2, num_heads=4, mlp_dim=128),
        BidirectionalMask(),
        head=DiscreteActionHead(ActionTokenizer(vocab_end=ACTION_VOCAB_END, action_dim=2)),
    ).eval()


def test_film_encoder_is_conditioned_on_the_mean_prompt_embedding():
    for fused in (False, True):
        model = _film_model(fused)
        assert model.encoder.has_film
        c = model.encoder.in_chans
        inputs = _inputs(channels=c)
        embeds = model.decoder.embed_tokens(inputs.input_ids)
        expected_condition = torch.stack([embeds[0].mean(0), embeds[1, :4].mean(0)])  # no pads
        torch.testing.assert_close(model.runner(inputs).language_vector(), expected_condition)
        expected = model.projector(model.encoder(inputs.pixels, condition=expected_condition))
        torch.testing.assert_close(model.runner(inputs).image_tokens, expected)
        other = _inputs(ids=inputs.input_ids.flip(0), channels=c)
        images = model.runner(inputs).image_tokens
        assert not torch.allclose(model.runner(other).image_tokens, images)
        actions = model.predict_action(inputs)
        assert actions.shape == (2, 1, 2)
        loss = model(_inputs(actions=torch.rand(2, 1, 2), channels=c)).loss
        loss.backward()
        film_grads = [p.grad for n, p in model.named_parameters() if ".film." in n]
        assert film_grads and all(g is not None and g.abs().sum() > 0 for g in film_grads)


def test_proprio_is_normalised_then_projected_into_one_token():
    torch.manual_seed(0)
    stats = {"q01": [-2.0, 0.0, 1.0], "q99": [2.0, 4.0, 3.0]}
    model = VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, D), PrefixInterleaver(bos_id=1, eos_id=2),
        llama(vocab_size=VOCAB_SIZE, dim=D, num_layers=1, num_heads=4, mlp_dim=128),
        CausalMask(), proprio_projector=ProprioProjector(3, D),
        proprio_normalizer=ActionNormalizer(stats),
    )
    proprio = torch.tensor([[2.0, 4.0, 3.0], [-2.0, 0.0, 1.0]])
    seq = model(_inputs(proprio=proprio)).sequence
    token = seq.embeds[seq.role_mask(TokenRole.PROPRIO)]  # [2, d]
    normalised = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    torch.testing.assert_close(model.proprio_normalizer.normalize(proprio), normalised)
    torch.testing.assert_close(token, model.proprio_projector(normalised))
    # without the normaliser the token differs: the normaliser is really applied
    model.proprio_normalizer = None
    seq = model(_inputs(proprio=proprio)).sequence
    assert not torch.allclose(seq.embeds[seq.role_mask(TokenRole.PROPRIO)], token)


def _openvla_like(dtype=None):
    from vlakit.models import openvla

    torch.manual_seed(0)
    return openvla(
        encoder=vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        projector=LinearProjector(32, D),
        decoder=llama(vocab_size=VOCAB_SIZE, dim=D, num_layers=1, num_heads=4, mlp_dim=128),
        action_tokenizer=ActionTokenizer(vocab_end=ACTION_VOCAB_END, action_dim=2),
        action_normalizer=ActionNormalizer({"q01": [-0.5, 0.0], "q99": [0.5, 2.0],
                                            "mask": [True, False]}),
    )


def test_a_meta_built_model_gets_its_normaliser_statistics_back_on_init():
    from vlakit.core import init_parameters

    reference = _openvla_like()
    with torch.device("meta"):
        model = _openvla_like()
    model.to_empty(device="cpu")
    init_parameters(model)
    for name, buffer in reference.action_normalizer.named_buffers():
        assert torch.equal(getattr(model.action_normalizer, name), buffer), name
    model.load_state_dict(reference.state_dict())
    inputs = _inputs()
    torch.testing.assert_close(model.predict_action(inputs), reference.predict_action(inputs))


def test_a_bf16_model_takes_a_float32_processor_batch():
    model = _openvla_like().to(torch.bfloat16)
    inputs = _inputs(actions=torch.rand(2, 1, 2) - 0.5)
    assert inputs.pixels.dtype == torch.float32
    loss = model(inputs).loss
    assert loss is not None and torch.isfinite(loss)
    assert model.predict_action(inputs).shape == (2, 1, 2)
    cast = inputs.to(dtype=torch.bfloat16)  # pixels only: targets, ids and masks stay
    assert cast.pixels.dtype == torch.bfloat16 and cast.input_ids.dtype == torch.long
    assert cast.text_valid.dtype == torch.bool and cast.actions.dtype == torch.float32


def test_batch_fields_are_checked_before_they_reach_torch():
    import pytest

    model = _openvla_like()
    inputs = _inputs()
    inputs.text_valid = inputs.text_valid.long()
    with pytest.raises(ValueError, match="text_valid must be a boolean mask"):
        model(inputs)


def test_prompts_holding_special_tokens_are_refused_with_the_fix():
    import pytest

    model = _openvla_like()
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])  # a tokenizer's default <s>
    with pytest.raises(ValueError, match=r"start with <s> \(id 1\).*add_special_tokens=False"):
        model.predict_action(_inputs(ids=ids))
    ids = torch.tensor([[5, 6, 7, 2], [8, 9, 10, 2]])
    with pytest.raises(ValueError, match=r"hold </s> \(id 2\) inside the prompt"):
        model.predict_action(_inputs(ids=ids))


def test_special_token_checks_leave_suffix_text_and_empty_prompts_alone():
    model = _openvla_like()
    ids = torch.tensor([[5, 6, 7, 2], [0, 0, 0, 0]])  # row 0: suffix text ending in </s>
    inputs = _inputs(ids=ids)
    inputs.text_valid = torch.tensor([[True] * 4, [False] * 4])  # row 1: an empty prompt
    inputs.token_type_ids = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    model.interleaver.bos_id = 0  # pad id == bos id, as some tokenizers have it
    assert model(inputs).sequence.valid.shape[0] == 2
