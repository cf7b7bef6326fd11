"""Real-time chunking as step wrappers (vlakit.heads.rtc): plain sampling without a previous
chunk, the guided step against the paper's formulas, the prefix and inpainting weights by
hand, the previous chunk's first d actions kept (inpainting) or approached (guidance) on tiny
models, bad knobs refused by name, and compiled models."""

import math
import os
import subprocess
import sys

import pytest
import torch
from test_continuous_heads import _inputs, _model

from vlakit.heads import DiffusionActionHead, FlowMatchingHead, Sampling, StepWrapper, euler
from vlakit.heads.rtc import (
    GuidedRTC,
    InpaintRTC,
    guidance_weight,
    inpaint_weights,
    prefix_weights,
)

ADIM, H = 3, 6
SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def _flow(chunk=H, steps=5):
    return _model(FlowMatchingHead(64, ADIM, chunk, num_steps=steps), "parallel")


def _diffusion(chunk=H):
    return _model(DiffusionActionHead(64, ADIM, chunk, num_inference_steps=4, layout="cached"),
                  "parallel")


def _seeded(seed, wrapper=None, **fields):
    return Sampling(generator=torch.Generator().manual_seed(seed), step_wrapper=wrapper, **fields)


def _leftover(k, batch=3, seed=9):
    """A previous chunk's unexecuted actions, normalised: [batch, k, ADIM] in [-1, 1]."""
    return torch.rand(batch, k, ADIM, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- weights ----------------------------------------------------------------------------------

def test_prefix_weights_match_hand_computed_values():
    # the kinetix reference's docstring example: d = 2, H - s = 6, H = 10
    linear = [1, 1, 4 / 5, 3 / 5, 2 / 5, 1 / 5, 0, 0, 0, 0]
    torch.testing.assert_close(prefix_weights(2, 4, 10, "linear"), torch.tensor(linear))
    exp = [c * (math.e ** c - 1) / (math.e - 1) for c in linear[:6]] + [0.0] * 4
    torch.testing.assert_close(prefix_weights(2, 4, 10, "exp"), torch.tensor(exp))
    assert exp[2] == pytest.approx(0.570589, abs=1e-6)
    assert exp[5] == pytest.approx(0.025770, abs=1e-6)
    torch.testing.assert_close(prefix_weights(2, 4, 10, "ones"),
                               torch.tensor([1.0] * 6 + [0.0] * 4))
    torch.testing.assert_close(prefix_weights(2, 4, 10, "zeros"),
                               torch.tensor([1.0] * 2 + [0.0] * 8))
    assert prefix_weights(2, 4, 10).tolist() == prefix_weights(2, 4, 10, "exp").tolist()
    # LeRobot's defaults: chunk 50, its execution_horizon = 10 is the paper's H - s (s = 40)
    w = prefix_weights(3, 40, 50, "linear")
    assert w[:3].tolist() == [1.0] * 3 and w[10:].abs().sum() == 0
    torch.testing.assert_close(w[3:10], torch.tensor([7, 6, 5, 4, 3, 2, 1]) / 8.0)
    # edges: no delay (the ramp starts at 1 - 1/(H - s + 1)), and d = s = H - d (no ramp)
    torch.testing.assert_close(prefix_weights(0, 2, 5, "linear"),
                               torch.tensor([3, 2, 1, 0, 0]) / 4.0)
    assert prefix_weights(2, 2, 4, "linear").tolist() == [1.0, 1.0, 0.0, 0.0]


def test_inpaint_weights_match_groot_ramp_by_hand():
    frozen, overlap, chunk, rate = 2, 6, 10, 5.0
    m = overlap - frozen
    # GR00T N1.7: t = linspace(0, 1, m + 2); ramp = 1 - e^(-rate t), / its last, middle m
    ramp = [(1 - math.exp(-rate * j / (m + 1))) / (1 - math.exp(-rate)) for j in range(1, m + 1)]
    want = [1.0] * frozen + [1 - r for r in ramp] + [0.0] * (chunk - overlap)
    torch.testing.assert_close(inpaint_weights(frozen, overlap, chunk, rate), torch.tensor(want))
    assert want[2] == pytest.approx(0.363591, abs=1e-6)
    assert inpaint_weights(3, 3, 5).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # frozen only
    w = inpaint_weights(0, 5, 5, 1.0)
    assert bool((w[1:] < w[:-1]).all()) and 0 < w[-1] < w[0] < 1  # a decreasing ramp


def test_guidance_weight_is_the_papers_and_clipped():
    for t in (0.2, 0.5, 0.7):
        tau = 1 - t
        r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
        assert guidance_weight(t, 100.0) == pytest.approx((1 - tau) / (tau * r2))
        assert guidance_weight(t, 100.0) == pytest.approx(guidance_weight(1 - t, 100.0))
    assert guidance_weight(1.0, 10) == 10.0  # t = 1 (the first Euler step): infinite, clipped
    assert guidance_weight(0.1, 3.0) == 3.0  # (1-tau)/tau ... = 11.1 there
    assert guidance_weight(0.5, 3.0) == pytest.approx(2.0)


# -- no previous chunk ----------------------------------------------------------------------

@pytest.mark.parametrize("build", [_flow, _diffusion])
def test_without_a_previous_chunk_sampling_is_plain_and_bit_identical(build):
    model = build()
    inputs = _inputs(actions=False)
    plain = model.predict_action(inputs, _seeded(4))
    for wrapper in (GuidedRTC(None, 1, 2), InpaintRTC(None, 1), InpaintRTC(None, 0, 0)):
        assert isinstance(wrapper, StepWrapper)
        assert torch.equal(model.predict_action(inputs, _seeded(4, wrapper)), plain)
    many = model.predict_action(inputs, _seeded(4, num_samples=2))
    assert torch.equal(model.predict_action(inputs, _seeded(4, GuidedRTC(None, 1, 2),
                                                            num_samples=2)), many)


# -- the guided step against the paper --------------------------------------------------------

def _toy_velocity():
    """A nonlinear velocity field in pi0's convention (t = 1 noise): v(x, t) [B, H, a]."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(ADIM, ADIM, generator=g) * 0.7
    along = torch.randn(8, 8, generator=g) * 0.3

    def velocity(x, t):
        return torch.tanh(x @ mix) * (1 + t[:, None, None]) + torch.einsum("ij,bja->bia", along,
                                                                        x.sin()) - 0.3 * x

    return velocity


def _paper_rtc(velocity, noise, prev, d, s, steps, beta):
    """The paper's guided inpainting in its own convention, written out: tau from 0 (noise) to 1,
    v_tau = a - eps (pi0's velocity negated at t = 1 - tau), a_hat = x + (1 - tau) v_tau,
    W the paper's soft mask (exp schedule), the full Jacobian (not a VJP), guidance weight
    min(beta, (1 - tau) / (tau r^2)), r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2),
    x += (1 / n) (v + weight J^T err)."""
    batch, chunk, a = noise.shape
    y = torch.zeros_like(noise)
    y[:, : prev.shape[1]] = prev
    W = torch.zeros(chunk)  # noqa: N806
    for i in range(chunk):
        if i < d:
            W[i] = 1.0
        elif i < chunk - s:
            c = (chunk - s - i) / (chunk - s - d + 1)
            W[i] = c * (math.exp(c) - 1) / (math.e - 1)

    x = noise.clone()
    for k in range(steps):
        tau = k / steps

        def paper_velocity(z, tau=tau):
            return -velocity(z, torch.full((batch,), 1 - tau))

        def denoiser(z, tau=tau, paper_velocity=paper_velocity):
            return z + (1 - tau) * paper_velocity(z)

        jac = torch.autograd.functional.jacobian(denoiser, x)  # [B, H, a, B, H, a]
        err = (y - denoiser(x)) * W[None, :, None]
        correction = torch.einsum("bha,bhacgf->cgf", err, jac)
        if tau == 0:
            weight = beta
        else:
            r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
            weight = min(beta, (1 - tau) / (tau * r2))
        x = x + (1 / steps) * (paper_velocity(x) + weight * correction)
    return x


@pytest.mark.parametrize("d, s, k, beta", [(2, 3, 5, 10.0), (1, 2, 6, 10.0), (3, 4, 4, 2.0),
                                            (0, 0, 8, 5.0)])
def test_guided_step_equals_the_papers_formulas_on_a_toy_field(d, s, k, beta):
    velocity = _toy_velocity()
    noise = torch.randn(2, 8, ADIM, generator=torch.Generator().manual_seed(1))
    prev = _leftover(k, batch=2)
    with torch.no_grad():  # as predict_action runs it
        got = euler(velocity, noise, 5, GuidedRTC(prev, d, s, max_guidance_weight=beta))
    want = _paper_rtc(velocity, noise, prev, d, s, 5, beta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = euler(velocity, noise, 5)
    if d:  # the guidance pulls towards the previous chunk (the sign is right)
        assert (got[:, :d] - prev[:, :d]).abs().mean() < (plain[:, :d] - prev[:, :d]).abs().mean()


def test_a_short_leftover_ends_the_soft_weights_where_it_ends():
    # k < H - s: the weights end at k (LeRobot clips its execution_horizon to the leftover),
    # so no step is pulled towards the zero padding
    velocity = _toy_velocity()
    noise = torch.randn(2, 8, ADIM, generator=torch.Generator().manual_seed(1))
    prev = _leftover(4, batch=2)
    got = euler(velocity, noise, 5, GuidedRTC(prev, 2, 2))  # H - s = 6 > k = 4
    torch.testing.assert_close(got, _paper_rtc(velocity, noise, prev, 2, 8 - 4, 5, 10.0))


# -- tiny models ------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [_flow, _diffusion])
def test_inpainting_keeps_the_frozen_steps_exactly(build):
    model = build()
    inputs = _inputs(actions=False)
    prev = _leftover(4)  # s = 2 of a 6-step chunk ran: a leftover of H - s = 4
    plain = model.predict_action(inputs, _seeded(1), unnormalize=False)
    out = model.predict_action(inputs, _seeded(1, InpaintRTC(prev, frozen=2)), unnormalize=False)
    assert torch.equal(out[:, :2], prev[:, :2])  # hard: the new chunk's first d actions
    assert not torch.allclose(out[:, 4:], plain[:, 4:])  # the free steps see the prefix
    # the ramp's steps start from the previous actions: closer to them than plain sampling
    assert (out[:, 2:4] - prev[:, 2:4]).abs().mean() < (plain[:, 2:4] - prev[:, 2:4]).abs().mean()
    many = model.predict_action(inputs, _seeded(1, InpaintRTC(prev, 2), num_samples=2),
                                unnormalize=False)
    assert torch.equal(many[:, :, :2], prev[:, None, :2].expand(-1, 2, -1, -1))
    # a leftover with fewer action dimensions is zero-padded; frozen only, overlap = frozen
    narrow = model.predict_action(inputs, _seeded(1, InpaintRTC(prev[..., :2], 3, overlap=3)),
                                  unnormalize=False)
    assert torch.equal(narrow[:, :3, :2], prev[:, :3, :2]) and narrow[:, :3, 2].abs().sum() == 0


def test_guidance_approaches_the_previous_chunk_as_its_weight_grows():
    model = _flow(chunk=8, steps=10)
    inputs = _inputs(actions=False)
    d, s = 2, 3
    prev = _leftover(8 - s)
    plain = model.predict_action(inputs, _seeded(1), unnormalize=False)

    def gap(out):
        return (out[:, :d] - prev[:, :d]).abs().max().item()

    gaps = []
    for beta in (0.1, 1.0, 3.0, 10.0):
        guided = GuidedRTC(prev, d, s, max_guidance_weight=beta)
        out = model.predict_action(inputs, _seeded(1, guided), unnormalize=False)
        assert not out.requires_grad
        gaps.append(gap(out))
    assert gaps == sorted(gaps, reverse=True) and len(set(gaps)) == 4, gaps
    assert gaps[-1] < 0.05 * gap(plain), (gaps, gap(plain))
    # gradients stayed local: nothing accumulated in the weights
    assert all(p.grad is None for p in model.parameters())
    # the full-sequence layout (no cached prefix) guides the same way
    full = _model(FlowMatchingHead(64, ADIM, 8, num_steps=10, layout="full"), "parallel")
    out = full.predict_action(inputs, _seeded(1, GuidedRTC(prev, d, s)), unnormalize=False)
    assert gap(out) < 0.05 * gap(full.predict_action(inputs, _seeded(1), unnormalize=False))


def test_raw_previous_chunks_are_normalised_with_the_models_normalizer():
    from vlakit.actions import ActionNormalizer

    norm = ActionNormalizer({"q01": [-2.0] * ADIM, "q99": [2.0] * ADIM})
    prev = _leftover(4)
    raw = norm.unnormalize(prev)
    a = InpaintRTC(raw, 2, normalizer=norm)
    torch.testing.assert_close(a.prev_chunk, prev)
    torch.testing.assert_close(GuidedRTC(raw, 2, 2, normalizer=norm).prev_chunk, prev)


# -- bad knobs --------------------------------------------------------------------------------

def test_bad_knobs_are_refused_naming_d_s_and_h():
    with pytest.raises(ValueError, match=r"d <= s <= H - d .* got d=3, s=2, H=8"):
        prefix_weights(3, 2, 8)
    with pytest.raises(ValueError, match=r"got d=2, s=7, H=8: s=7 > H - d = 6"):
        prefix_weights(2, 7, 8)
    with pytest.raises(ValueError, match=r"delay d must be >= 0, got -1"):
        prefix_weights(-1, 2, 8)
    with pytest.raises(TypeError, match=r"execution_horizon s must be an integer"):
        prefix_weights(1, True, 8)
    with pytest.raises(ValueError, match=r"chunk H must be >= 1"):
        prefix_weights(0, 0, 0)
    with pytest.raises(ValueError, match=r"schedule must be one of .* got 'cosine'"):
        prefix_weights(1, 2, 8, "cosine")
    with pytest.raises(ValueError, match=r"got d=3 > s=2"):
        GuidedRTC(_leftover(4), 3, 2)
    with pytest.raises(ValueError, match=r"k=1 actions, fewer than the delay d=2"):
        GuidedRTC(_leftover(1), 2, 2)
    with pytest.raises(ValueError, match=r"max_guidance_weight must be a finite number > 0"):
        GuidedRTC(_leftover(4), 1, 2, max_guidance_weight=0)
    # (under VLAKIT_TYPECHECK the shape annotation refuses it first)
    with pytest.raises((ValueError, TypeError), match=r"\[batch, k, action_dim\]|'b k a'"):
        GuidedRTC(torch.zeros(4, ADIM), 1, 2)
    with pytest.raises(ValueError, match="non-finite"):
        InpaintRTC(torch.full((1, 2, ADIM), float("nan")), 1)
    with pytest.raises(ValueError, match=r"frozen <= overlap <= H .* frozen=3, overlap=2, H=8"):
        inpaint_weights(3, 2, 8)
    with pytest.raises(ValueError, match=r"frozen <= overlap .* got frozen=3, overlap=2"):
        InpaintRTC(_leftover(4), 3, overlap=2)
    with pytest.raises(ValueError, match=r"got frozen=5, overlap=4"):
        InpaintRTC(_leftover(4), 5)  # overlap: the leftover's k = 4
    with pytest.raises(ValueError, match=r"overlap=5 exceeds the k=4 actions"):
        InpaintRTC(_leftover(4), 1, overlap=5)
    with pytest.raises(ValueError, match=r"ramp_rate must be a finite number > 0"):
        InpaintRTC(_leftover(4), 1, ramp_rate=0.0)

    # what needs the chunk is checked at the first step, with the model's H
    flow, inputs = _flow(), _inputs(actions=False)
    with pytest.raises(ValueError, match=r"got d=2, s=5, H=6"):
        flow.predict_action(inputs, _seeded(0, GuidedRTC(_leftover(4), 2, 5)))
    with pytest.raises(ValueError, match=r"k=7 actions, more than the chunk H=6"):
        flow.predict_action(inputs, _seeded(0, GuidedRTC(_leftover(7), 1, 1)))
    with pytest.raises(ValueError, match=r"overlap=7 exceeds the chunk H=6"):
        flow.predict_action(inputs, _seeded(0, InpaintRTC(_leftover(7), 1)))
    with pytest.raises(ValueError, match=r"2 rows but the sample has 3"):
        flow.predict_action(inputs, _seeded(0, InpaintRTC(_leftover(4, batch=2), 1)))
    with pytest.raises(ValueError, match=r"4 action dimensions, the head 3"):
        flow.predict_action(inputs, _seeded(0, InpaintRTC(torch.zeros(3, 4, 4), 1)))


def test_guided_rtc_refuses_diffusion_steps_and_inference_mode():
    with pytest.raises(ValueError, match=r"diffusion scheduler's .* use InpaintRTC"):
        _diffusion().predict_action(_inputs(actions=False),
                                    _seeded(0, GuidedRTC(_leftover(4), 1, 2)))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="not torch.inference_mode"):
        euler(_toy_velocity(), torch.zeros(1, 8, ADIM), 2, GuidedRTC(_leftover(4, batch=1), 1, 2))


# -- compiled ---------------------------------------------------------------------------------

def test_rtc_wrappers_run_around_a_compiled_model():
    # A fresh process without VLAKIT_TYPECHECK: beartype's wrappers are not traceable.
    env = {k: v for k, v in os.environ.items() if k != "VLAKIT_TYPECHECK"}
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, "compile_rtc.py")],
                          capture_output=True, text=True, timeout=900, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for name in ("flow/parallel/cached", "diffusion/parallel/cached",
                 "diffusion/bidirectional/oft"):
        assert f"{name}: inpainting fullgraph OK, the" in out, out[-4000:]
    assert "flow/parallel/cached: guided fullgraph OK, 1 more graphs" in out, out[-4000:]
    assert "COMPILE RTC OK" in out, out[-4000:]
