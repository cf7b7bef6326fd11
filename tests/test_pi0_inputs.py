"""pi0's and pi0.5's inputs: absent cameras masked out of the prefix, the processors (prompt
length, truncation only when asked, pi0.5's state prompt), and the policy bundle for both."""

import dataclasses

import numpy as np
import pytest
import torch
from test_pi0_parity import ADIM, CHUNK, MAX_DIM, PATCHES, STATE_DIM, VIEWS, _inputs, _tiny
from torch import Tensor

from vlakit import VLAInputs
from vlakit.actions import ActionNormalizer
from vlakit.bundle import ObservationKeys, PolicyBundle
from vlakit.heads import Sampling
from vlakit.models import pi0, pi0_decoder, pi0_expert, pi05
from vlakit.processors import Pi0Processor, Pi05Processor, pi05_prompt, word_tokenizer
from vlakit.projectors import LinearProjector
from vlakit.vision import vit

# -- absent cameras -----------------------------------------------------------------------


def _without_view(inputs: VLAInputs, view: int) -> VLAInputs:
    """The same batch with camera ``view`` physically removed: its pixels and its
    placeholders (the reference a mask must equal)."""
    keep = [v for v in range(inputs.pixels.shape[1]) if v != view]
    ids, valid = inputs.input_ids[:, PATCHES:], inputs.text_valid[:, PATCHES:]
    return dataclasses.replace(inputs, input_ids=ids, text_valid=valid,
                               pixels=inputs.pixels[:, keep])


def _noise(batch: int) -> Tensor:
    return torch.randn(batch, CHUNK, MAX_DIM, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_an_absent_camera_in_every_row_equals_a_batch_without_it(variant):
    model = _tiny(variant)
    inputs = _inputs(variant == "pi0")
    masked = dataclasses.replace(inputs, view_valid=torch.tensor([[True, False]] * 3))
    sampling = Sampling(noise=_noise(3))
    got = model.predict_action(masked, sampling, unnormalize=False)
    want = model.predict_action(_without_view(inputs, 1), sampling, unnormalize=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and what the absent camera's pixels hold does not matter (LeRobot fills -1)
    other = masked.pixels.clone()
    other[:, 1] = -1.0
    again = model.predict_action(dataclasses.replace(masked, pixels=other), sampling,
                                 unnormalize=False)
    torch.testing.assert_close(again, got, atol=1e-6, rtol=1e-6)
    present = model.predict_action(inputs, sampling, unnormalize=False)
    assert not torch.allclose(present, got, atol=1e-3)  # the mask does change the prefix


def test_an_absent_camera_in_one_row_leaves_the_others_alone():
    model = _tiny("pi0")
    inputs = _inputs(True)
    view_valid = torch.ones(3, VIEWS, dtype=torch.bool)
    view_valid[1, 0] = False  # row 1 lacks its first camera
    masked = dataclasses.replace(inputs, view_valid=view_valid)
    sampling = Sampling(noise=_noise(3))
    got = model.predict_action(masked, sampling, unnormalize=False)
    full = model.predict_action(inputs, sampling, unnormalize=False)
    torch.testing.assert_close(got[[0, 2]], full[[0, 2]], atol=1e-5, rtol=1e-5)
    alone = _without_view(inputs.rows([1]), 0)
    want = model.predict_action(alone, Sampling(noise=_noise(3)[1:2]), unnormalize=False)
    torch.testing.assert_close(got[1:2], want, atol=1e-5, rtol=1e-5)


def test_the_training_loss_masks_an_absent_camera_too():
    model = _tiny("pi0").train()
    inputs = _inputs(True, actions=True)
    masked = dataclasses.replace(inputs, view_valid=torch.tensor([[True, False]] * 3))
    draws = dict(noise=_noise(3), time=torch.tensor([0.3, 0.6, 0.9]))
    got = model(masked, sampling=Sampling(**draws)).loss
    want = model(_without_view(inputs, 1), sampling=Sampling(**draws)).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _unchecked(inputs, **fields):
    """``inputs`` with fields replaced past the dataclass's jaxtyping check (on in the
    tests, off in a user's run: check_batch must catch these)."""
    inputs = dataclasses.replace(inputs)
    for name, value in fields.items():
        setattr(inputs, name, value)
    return inputs


def test_a_bad_view_mask_is_refused_by_shape_and_dtype():
    model = _tiny("pi0")
    inputs = _inputs(True)
    with pytest.raises(ValueError, match=r"view_valid has shape \(3, 3\), expected .*\(3, 2\)"):
        model.predict_action(_unchecked(inputs, view_valid=torch.ones(3, 3).bool()))
    with pytest.raises(ValueError, match="view_valid must be a boolean"):
        model.predict_action(_unchecked(inputs, view_valid=torch.ones(3, 2)))


# -- processors ---------------------------------------------------------------------------

TASKS = ["pick up the red block", "open the drawer"]
LONG = "put " + " ".join(["the block"] * 30) + " in the box"


def _tokenizer():
    return word_tokenizer([*TASKS, LONG, pi05_prompt("x", np.zeros(STATE_DIM)),
                           "Task : , State ; Action"])


def _model(variant: str, tokenizer, **kwargs):
    torch.manual_seed(0)
    vocab = len(tokenizer)
    parts = dict(
        encoder=vit(img_size=28, patch_size=14, dim=24, depth=1, num_heads=2, mlp_dim=48),
        projector=LinearProjector(24, 32, bias=True),
        decoder=pi0_decoder(vocab_size=vocab, dim=32, num_layers=2, num_heads=2,
                            num_kv_heads=1, head_dim=8, mlp_dim=64),
        action_dim=ADIM, chunk_size=CHUNK, max_dim=MAX_DIM, image_token_id=vocab,
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, num_views=2,
        action_normalizer=ActionNormalizer({"mean": [0.0] * ADIM, "std": [2.0] * ADIM},
                                           mode="normal", form="lerobot"),
    )
    expert = pi0_expert(dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                        mlp_dim=32, cond_dim=16 if variant == "pi05" else None)
    if variant == "pi05":
        bounds = {"q01": [-1.0] * STATE_DIM, "q99": [1.0] * STATE_DIM}
        state = ActionNormalizer(bounds, mode="bounds_q99", form="lerobot", name="proprio")
        return pi05(expert=expert, state_normalizer=state, **parts, **kwargs).eval()
    return pi0(expert=expert, **parts, **kwargs).eval()


def _images(batch: int = 2):
    return torch.randint(0, 256, (batch, 2, 3, 40, 28), dtype=torch.uint8)  # not square


def test_pi0_processor_pads_the_text_to_the_prompt_length():
    tok = _tokenizer()
    model = _model("pi0", tok, prompt_length=12)
    processor = Pi0Processor.from_model(tok, model)
    assert processor.prompt_length == 12
    batch = processor(_images(), TASKS, proprio=torch.zeros(2, STATE_DIM))
    placeholders = 2 * PATCHES
    assert batch.input_ids.shape == (2, placeholders + 12)  # fixed, whatever the prompts
    first = [tok.bos_token_id] + tok(TASKS[0] + "\n", add_special_tokens=False)["input_ids"]
    row = batch.input_ids[0, placeholders:]
    assert row[: len(first)].tolist() == first
    assert batch.text_valid[0].sum() == placeholders + len(first)
    assert batch.proprio.shape == (2, STATE_DIM)  # raw: the model normalises it
    assert batch.pixels.shape == (2, 2, 3, 28, 28)  # letterboxed to the square SigLIP reads
    assert model.predict_action(batch).shape == (2, CHUNK, ADIM)


def test_a_long_prompt_is_refused_unless_truncation_is_asked_for():
    tok = _tokenizer()
    model = _model("pi0", tok, prompt_length=12)
    processor = Pi0Processor.from_model(tok, model)
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens .* over prompt_length=12.*"
                                         r"truncate=True"):
        processor(_images(), [TASKS[0], LONG], proprio=torch.zeros(2, STATE_DIM))
    cutting = Pi0Processor.from_model(tok, model, truncate=True)
    with pytest.warns(UserWarning, match=r"prompt 1 is \d+ tokens .* cut to its first 12"):
        batch = cutting(_images(), [TASKS[0], LONG], proprio=torch.zeros(2, STATE_DIM))
    assert batch.text_valid[1].sum() == 2 * PATCHES + 12
    assert cutting.config()["truncate"] is True


def test_pi05_processor_writes_the_normalised_state_into_the_prompt():
    tok = _tokenizer()
    model = _model("pi05", tok, prompt_length=40)
    processor = Pi05Processor.from_model(tok, model)
    state = torch.tensor([[-1.5, -0.2, 0.3, 2.0], [0.0, 0.5, 0.99, -1.0]])
    batch = processor(_images(), TASKS, proprio=state)
    assert batch.proprio is None  # the state is in the prompt, not a token
    text = pi05_prompt(TASKS[0], model.proprio_normalizer.normalize(state[0]))
    assert "State: -1 " in text  # below q01: bin -1, as LeRobot (nothing clipped)
    want = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert batch.input_ids[0, 2 * PATCHES: 2 * PATCHES + len(want)].tolist() == want
    assert model.predict_action(batch).shape == (2, CHUNK, ADIM)
    with pytest.raises(ValueError, match="proprio is None"):
        processor(_images(), TASKS)
    model.proprio_normalizer = None
    with pytest.raises(ValueError, match="no proprio_normalizer"):
        Pi05Processor.from_model(tok, model)


# -- the policy bundle --------------------------------------------------------------------


def _observation(state_dim: int = STATE_DIM, wrist=True):
    rng = np.random.default_rng(0)
    return {"observation/image": rng.integers(0, 256, (40, 28, 3), dtype=np.uint8),
            "observation/wrist_image": (rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                                        if wrist else None),
            "observation/state": rng.standard_normal(state_dim).astype(np.float32),
            "prompt": TASKS[0]}


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_a_pi0_bundle_reads_the_state_and_round_trips(variant, tmp_path):
    tok = _tokenizer()
    model = _model(variant, tok, prompt_length=40)
    processor = (Pi05Processor if variant == "pi05" else Pi0Processor).from_model(tok, model)
    keys = ObservationKeys.for_model(model)
    assert keys.state == "observation/state"  # pi0: the head reads it; pi0.5: the prompt
    bundle = PolicyBundle(model, processor, keys)
    noise = Sampling(noise=_noise(1))
    chunk = bundle(_observation(), noise)
    assert chunk.shape == (CHUNK, ADIM)
    loaded = PolicyBundle.load(bundle.save(tmp_path / "policy"))
    assert type(loaded.processor) is type(processor)
    np.testing.assert_allclose(loaded(_observation(), Sampling(noise=_noise(1))), chunk,
                               atol=1e-5)
    with pytest.raises(ValueError, match="reads the robot state"):
        PolicyBundle(model, processor, ObservationKeys(images=keys.images))


def test_a_bundle_masks_a_camera_given_as_none():
    tok = _tokenizer()
    model = _model("pi0", tok, prompt_length=40)
    bundle = PolicyBundle(model, Pi0Processor.from_model(tok, model),
                          ObservationKeys.for_model(model))
    batch = bundle.inputs([_observation(wrist=False), _observation()])
    assert batch.view_valid.tolist() == [[True, False], [True, True]]
    # the absent camera: a black frame, -1 after pi0's [-1, 1] scaling, as LeRobot fills it
    assert bool((batch.pixels[0, 1] == -1).all())
    assert bundle(_observation(wrist=False)).shape == (CHUNK, ADIM)
    missing = _observation()
    del missing["observation/wrist_image"]
    with pytest.raises(KeyError, match="lacks \\['observation/wrist_image'\\]"):
        bundle(missing)


def test_lerobot_normalisation_formulas():
    """LeRobot's NormalizerProcessorStep, written out: MEAN_STD ``(x - mean) / (std + eps)``
    and back ``y std + mean``; QUANTILES ``2 (x - q01) / r - 1`` with ``r = q99 - q01`` (eps
    where 0) and back ``(y + 1) r / 2 + q01``; nothing clipped."""
    x = torch.tensor([[-3.0, 0.5, 2.0], [1.0, 7.0, 2.0]])
    mean, std = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([2.0, 0.0, 1.0])
    normal = ActionNormalizer({"mean": mean, "std": std}, mode="normal", form="lerobot")
    torch.testing.assert_close(normal.normalize(x), (x - mean) / (std + 1e-8))
    torch.testing.assert_close(normal.unnormalize(x), x * std + mean)
    q01, q99 = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 4.0, 2.0])
    bounds = ActionNormalizer({"q01": q01, "q99": q99}, mode="bounds_q99", form="lerobot")
    span = torch.where(q99 == q01, torch.tensor(1e-8), q99 - q01)
    torch.testing.assert_close(bounds.normalize(x), 2 * (x - q01) / span - 1)
    assert bounds.normalize(x)[0, 0] == -3.0  # below q01: not clipped
    torch.testing.assert_close(bounds.unnormalize(x), (x + 1) * span / 2 + q01)


# -- a token pruner on pi0's prefix (a hybrid no peer has) ----------------------------------


def _first_view_score(image_tokens: Tensor, seq) -> Tensor:
    """Scores that keep the first view's tokens (earlier tokens score higher)."""
    b, p, _ = image_tokens.shape
    return -torch.arange(p, dtype=torch.float32).expand(b, p)


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_the_expert_attends_to_the_pruned_prefix(variant):
    from vlakit.pruners import TopKPruner

    inputs = _inputs(variant == "pi0")
    sampling = Sampling(noise=_noise(3))
    keep_all = _tiny(variant).add_pruner(TopKPruner(keep_ratio=1.0, score=_first_view_score))
    plain = _tiny(variant)
    torch.testing.assert_close(keep_all.predict_action(inputs, sampling, unnormalize=False),
                               plain.predict_action(inputs, sampling, unnormalize=False))
    pruned = _tiny(variant).add_pruner(TopKPruner(keep=PATCHES, score=_first_view_score))
    prefix = pruned.runner(inputs).prefix(1, suffix_len=CHUNK + 1)
    assert prefix.seq.num_image_tokens == PATCHES  # the second view's tokens are gone
    got = pruned.predict_action(inputs, sampling, unnormalize=False)
    other = dataclasses.replace(inputs, pixels=inputs.pixels.clone())
    other.pixels[:, 1] = torch.randn_like(other.pixels[:, 1])  # only the pruned view moves
    torch.testing.assert_close(pruned.predict_action(other, sampling, unnormalize=False), got)
    assert not torch.allclose(plain.predict_action(other, sampling, unnormalize=False),
                              plain.predict_action(inputs, sampling, unnormalize=False))
    # rows are independent under the pruner: row 1 alone equals row 1 in the batch
    alone = pruned.predict_action(inputs.rows([1]), Sampling(noise=_noise(3)[1:2]),
                                  unnormalize=False)
    torch.testing.assert_close(alone, got[1:2], atol=1e-5, rtol=1e-5)


def test_lightvla_prunes_pi0s_prefix_in_training_and_prediction():
    from vlakit.pruners import LightVLAPruner

    model = _tiny("pi0").add_pruner(LightVLAPruner(noise_scale=0.1))
    inputs = _inputs(True, actions=True)
    model.train()
    loss = model(inputs, sampling=Sampling(generator=torch.Generator().manual_seed(0))).loss
    loss.backward()  # through the pruner's differentiable choice to the vision tower
    assert model.encoder.patch_embed.proj.weight.grad is not None
    model.eval()
    chunk = model.predict_action(dataclasses.replace(inputs, actions=None),
                                 Sampling(noise=_noise(3)), unnormalize=False)
    assert chunk.shape == (3, CHUNK, ADIM) and torch.isfinite(chunk).all()


def test_non_square_pixels_and_a_missing_view_are_refused_naming_both():
    tok = _tokenizer()
    model = _model("pi0", tok)
    processor = Pi0Processor.from_model(tok, model)
    state = torch.zeros(1, STATE_DIM)
    wide = processor(None, TASKS[:1], proprio=state, pixels=torch.zeros(1, 2, 3, 28, 42))
    with pytest.raises(ValueError, match="expected image size 28x28.*got 28x42"):
        model.predict_action(wide)
    one = processor(torch.zeros(1, 1, 3, 28, 28, dtype=torch.uint8), TASKS[:1], proprio=state)
    with pytest.raises(ValueError, match="built for 2 camera view.*has 1.*view_valid False"):
        model.predict_action(one)
