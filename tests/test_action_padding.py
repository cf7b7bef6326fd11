"""Chunks padded past an episode's end carry ``action_is_pad``; every head's loss leaves the
padded steps out (LeRobot's mask), so their values cannot move the loss."""

import dataclasses

import pytest
import torch
from _tiny import ACTION_VOCAB_END
from test_continuous_heads import CHUNK, _inputs, _model

from vlakit import VLA
from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.batch import check_batch
from vlakit.core import CausalMask
from vlakit.decoders import llama
from vlakit.heads import DiffusionActionHead, DiscreteActionHead, Sampling, action_loss_mean
from vlakit.interleave import PrefixInterleaver
from vlakit.projectors import LinearProjector
from vlakit.vision import vit


def _discrete():
    torch.manual_seed(0)
    head = DiscreteActionHead(ActionTokenizer(vocab_end=ACTION_VOCAB_END, action_dim=3),
                              chunk_size=CHUNK, predict_eos=False)
    return VLA(vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
               LinearProjector(32, 64), PrefixInterleaver(bos_id=1, eos_id=2),
               llama(vocab_size=320, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     mlp_dim=128),
               CausalMask(), head=head, num_views=2,
               proprio_projector=None,
               action_normalizer=ActionNormalizer({"q01": [-1.0] * 3, "q99": [1.0] * 3}))


def _builders():
    return {
        "l1": lambda: _model("l1"),
        "flow": lambda: _model("flow", "parallel"),
        "diffusion": lambda: _model(DiffusionActionHead(64, 3, CHUNK, num_inference_steps=3,
                                                        layout="cached"), "parallel"),
        "discrete": _discrete,
    }


def _given(model, inputs):
    b = inputs.input_ids.shape[0]
    if "Flow" in type(model.head).__name__:
        return Sampling(noise=torch.randn(b, CHUNK, 3, generator=torch.Generator().manual_seed(2)),
                        time=torch.tensor([0.3, 0.6, 0.9]))
    if "Diffusion" in type(model.head).__name__:
        return Sampling(noise=torch.randn(b, CHUNK, 3, generator=torch.Generator().manual_seed(2)),
                        time=torch.tensor([3, 20, 40]))
    return None


def _pad_mask():
    is_pad = torch.zeros(3, CHUNK, dtype=torch.bool)
    is_pad[0, 1:] = True  # row 0's chunk crosses its episode's end after the first step
    is_pad[2, :] = True  # row 2 is padding throughout
    return is_pad


_PREDICTION = {"l1": "actions_from", "flow": "velocity", "diffusion": "predict_noise"}


@pytest.mark.parametrize("name", ["l1", "flow", "diffusion"])
def test_padded_steps_get_no_gradient_from_a_continuous_heads_loss(name, monkeypatch):
    model = _builders()[name]().train()
    inputs = dataclasses.replace(_inputs(), action_is_pad=_pad_mask())
    head, method = model.head, _PREDICTION[name]
    seen = []
    original = getattr(head, method)

    def keep(*args, **kwargs):  # the head's per-step prediction [b, c, a], its gradient kept
        out = original(*args, **kwargs)
        out.retain_grad()
        seen.append(out)
        return out

    monkeypatch.setattr(head, method, keep)
    model(inputs, sampling=_given(model, inputs)).loss.backward()
    grad = seen[-1].grad  # [b, c, a]
    assert torch.all(grad[_pad_mask()] == 0)  # padded steps: no gradient at all
    assert torch.all(grad[~_pad_mask()].abs().sum(-1) > 0)  # every real step: some


def test_padded_steps_do_not_move_the_token_loss():
    model = _discrete().train()
    inputs = dataclasses.replace(_inputs(), proprio=None)
    padded = dataclasses.replace(inputs, action_is_pad=_pad_mask())
    loss = model(padded).loss
    # what sits in the padded steps is irrelevant (the dataset repeats the last step there)
    moved = inputs.actions.clone()
    moved[0, 1:] = -0.9
    moved[2] = 0.9
    torch.testing.assert_close(loss, model(dataclasses.replace(padded, actions=moved)).loss)
    real = moved.clone()
    real[1, 0] = -0.9  # a real step's value is
    assert not torch.allclose(loss, model(dataclasses.replace(padded, actions=real)).loss)
    # without the mask, the padding is trained on
    unmasked = model(inputs).loss
    assert not torch.allclose(unmasked, model(dataclasses.replace(inputs, actions=moved)).loss)


@pytest.mark.parametrize("name", ["l1", "flow", "diffusion", "discrete"])
def test_a_mask_marking_nothing_gives_the_unmasked_loss(name):
    model = _builders()[name]().train()
    inputs = _inputs()
    if name == "discrete":
        inputs = dataclasses.replace(inputs, proprio=None)
    none = dataclasses.replace(inputs, action_is_pad=torch.zeros(3, CHUNK, dtype=torch.bool))
    torch.testing.assert_close(model(none, sampling=_given(model, inputs)).loss,
                               model(inputs, sampling=_given(model, inputs)).loss)


def test_action_loss_mean_counts_real_steps_only():
    errors = torch.arange(12.0).reshape(1, 2, 6).expand(2, -1, -1).clone()  # [2, 2, 6]
    is_pad = torch.tensor([[False, True], [False, False]])
    expected = (errors[0, 0].sum() + errors[1].sum()) / 18
    torch.testing.assert_close(action_loss_mean(errors, is_pad), expected)
    assert action_loss_mean(errors, torch.ones(2, 2, dtype=torch.bool)) == 0
    torch.testing.assert_close(action_loss_mean(errors, None), errors.mean())


def _unchecked(inputs, **fields):
    """``inputs`` with fields replaced, past the dataclass's own type check (the tests run
    with jaxtyping checks on; a user's run has none, so check_batch must catch these)."""
    inputs = dataclasses.replace(inputs)
    for name, value in fields.items():
        setattr(inputs, name, value)
    return inputs


def test_a_bad_pad_mask_is_refused_naming_the_shape():
    inputs = _inputs()
    with pytest.raises(ValueError, match=r"action_is_pad has shape \(3, 5\), expected"):
        check_batch(_unchecked(inputs, action_is_pad=torch.zeros(3, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="must be a boolean mask"):
        check_batch(_unchecked(inputs, action_is_pad=torch.zeros(3, CHUNK)))
    with pytest.raises(ValueError, match="without inputs.actions"):
        check_batch(_unchecked(inputs, actions=None,
                               action_is_pad=torch.zeros(3, CHUNK, dtype=torch.bool)))


def test_diffusion_timesteps_out_of_range_are_named():
    diffusion = _builders()["diffusion"]().train()
    with pytest.raises(ValueError, match=r"timesteps \[3, 20, 60\], outside 0..49"):
        diffusion(_inputs(), sampling=Sampling(time=torch.tensor([3, 20, 60])))
