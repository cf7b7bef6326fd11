"""Samplers are free functions, sampling is an argument: generators, given noise, given
training draws, and step wrappers (what real-time chunking will be)."""

import copy

import pytest
import torch
from test_continuous_heads import _inputs, _model

from vlakit.heads import (
    DenoiseStep,
    DiffusionActionHead,
    HeadTokens,
    Sampling,
    StepWrapper,
    euler,
    scheduler_denoise,
)

CHUNK, ADIM = 2, 3


def _flow():
    return _model("flow", "parallel")


def _diffusion():
    head = DiffusionActionHead(64, ADIM, CHUNK, num_inference_steps=4, layout="cached")
    return _model(head, "parallel")


def _unnormalize(model, x):
    norm = model.action_normalizer
    return x if norm is None else norm.unnormalize(x)


def _normalize(model, x):
    norm = model.action_normalizer
    return x if norm is None else norm.normalize(x)


def _seeded(seed, **fields):
    return Sampling(generator=torch.Generator().manual_seed(seed), **fields)


@pytest.mark.parametrize("build", [_flow, _diffusion])
def test_the_same_generator_gives_bit_identical_actions(build):
    model = build()
    inputs = _inputs(actions=False)
    first = model.predict_action(inputs, _seeded(4))
    again = model.predict_action(inputs, _seeded(4))
    other = model.predict_action(inputs, _seeded(5))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    many = model.predict_action(inputs, _seeded(4, num_samples=3))
    assert torch.equal(many, model.predict_action(inputs, _seeded(4, num_samples=3)))
    assert many.shape == (3, 3, CHUNK, ADIM)


def _rows(inputs, i):
    """Row ``i`` of a batch, alone."""
    return inputs.rows(slice(i, i + 1))


def _per_row(seeds):
    return tuple(torch.Generator().manual_seed(s) for s in seeds)


@pytest.mark.parametrize("num_samples", [None, 2])
@pytest.mark.parametrize("build", [_flow, _diffusion])
def test_one_generator_per_row_makes_batching_invisible(build, num_samples):
    model = build()
    inputs = _inputs(actions=False)
    seeds = (11, 12, 13)
    batched = model.predict_action(inputs, Sampling(num_samples, generator=_per_row(seeds)))
    for i, seed in enumerate(seeds):
        alone = model.predict_action(_rows(inputs, i),
                                     Sampling(num_samples, generator=_per_row([seed])))
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    # a single shared generator does not have this property: the rows' noise depends on
    # the batch (this is why per-row generators exist)
    shared = model.predict_action(inputs, Sampling(num_samples, generator=_per_row([12])[0]))
    alone = model.predict_action(_rows(inputs, 1), Sampling(num_samples, generator=_per_row([12])))
    assert not torch.allclose(shared[1:2], alone, atol=1e-3)
    with pytest.raises(ValueError, match="holds 2 generators but the batch has 3 examples"):
        model.predict_action(inputs, Sampling(generator=_per_row([1, 2])))


@pytest.mark.parametrize("build", [_flow, _diffusion])
def test_one_generator_per_row_in_training(build):
    model = build().train()
    inputs = _inputs()
    def loss(seeds):
        return model(inputs, sampling=Sampling(generator=_per_row(seeds))).loss

    assert torch.equal(loss([1, 2, 3]), loss([1, 2, 3]))
    assert not torch.equal(loss([1, 2, 3]), loss([1, 2, 4]))


def test_a_stochastic_schedulers_step_noise_follows_the_rows_generators():
    from diffusers import DDPMScheduler

    def predict(x, k):
        return torch.zeros_like(x)

    def run(seeds, rows):
        scheduler = DDPMScheduler(num_train_timesteps=10)
        return scheduler_denoise(predict, torch.ones(rows, 1, 3), scheduler, 5,
                                 generator=list(_per_row(seeds)))

    torch.testing.assert_close(run([4, 5], 2)[1:], run([5], 1))


@pytest.mark.parametrize("build", [_flow, _diffusion])
def test_prediction_never_touches_the_global_random_state(build):
    model = build()
    inputs = _inputs(actions=False)
    state = torch.random.get_rng_state()
    a = model.predict_action(inputs)
    b = model.predict_action(inputs)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.allclose(a, b)  # fresh randomness each call, not a fixed seed


def test_given_noise_gives_what_a_hand_written_euler_loop_gives():
    """Flow at batch 3: x = noise, then for k < K: x += dt * v(x, 1 + k dt), v read from a
    full pass with the head's action tokens (the cached prefix must agree)."""
    model = _flow()
    head = model.head
    inputs = _inputs(actions=False)
    noise = torch.randn(3, CHUNK, ADIM, generator=torch.Generator().manual_seed(0))
    got = model.predict_action(inputs, Sampling(noise=noise))
    runner = model.runner(inputs)
    x, dt = noise.clone(), -1.0 / head.num_steps
    with torch.no_grad():
        for k in range(head.num_steps):
            t = torch.full((3,), 1.0 + k * dt)
            hidden, seq = runner.run(HeadTokens(action_embeds=head.embed_actions(x, t)))
            x = x + dt * head.velocity(hidden, seq)
    want = _unnormalize(model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_given_noise_gives_what_a_hand_written_scheduler_loop_gives():
    """Diffusion at batch 3: x = noise, then the scheduler's own step per timestep."""
    model = _diffusion()
    head = model.head
    inputs = _inputs(actions=False)
    noise = torch.randn(3, CHUNK, ADIM, generator=torch.Generator().manual_seed(1))
    got = model.predict_action(inputs, Sampling(noise=noise))
    scheduler = copy.deepcopy(head.scheduler)
    scheduler.set_timesteps(head.num_inference_steps)
    runner = model.runner(inputs)
    x = noise.clone()
    with torch.no_grad():
        for k in scheduler.timesteps.tolist():
            hidden, seq = runner.run(head.tokens(x, torch.full((3,), k), runner.dtype))
            x = scheduler.step(head.predict_noise(hidden, seq), k, x).prev_sample
    torch.testing.assert_close(got, _unnormalize(model, x), atol=1e-5, rtol=1e-5)


class Recorder:
    """A step wrapper that records every step and can move the sample (as inpainting does)."""

    def __init__(self, shift: float = 0.0) -> None:
        self.steps: list[DenoiseStep] = []
        self.shift = shift

    def __call__(self, step: DenoiseStep) -> torch.Tensor:
        self.steps.append(step)
        return step.run(step.x + self.shift)


@pytest.mark.parametrize("build", [_flow, _diffusion])
def test_a_step_wrapper_is_called_every_step_and_can_change_x(build):
    model = build()
    count = getattr(model.head, "num_steps", None) or model.head.num_inference_steps
    inputs = _inputs(actions=False)
    noise = torch.randn(3, CHUNK, ADIM, generator=torch.Generator().manual_seed(2))
    plain = model.predict_action(inputs, Sampling(noise=noise))
    recorder = Recorder()
    assert isinstance(recorder, StepWrapper)
    same = model.predict_action(inputs, Sampling(noise=noise, step_wrapper=recorder))
    assert torch.equal(same, plain)  # a wrapper that only records changes nothing
    assert [s.index for s in recorder.steps] == list(range(count))
    assert all(s.num_steps == count and s.x.shape == (3, CHUNK, ADIM) for s in recorder.steps)
    assert torch.equal(recorder.steps[0].x, noise)
    moved = model.predict_action(inputs, Sampling(noise=noise, step_wrapper=Recorder(0.5)))
    assert not torch.allclose(moved, plain)


def test_euler_times_and_the_wrapper_see_the_velocity():
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.ones_like(x) * 2.0

    x = euler(velocity, torch.zeros(2, 1, 1), num_steps=4)
    torch.testing.assert_close(x, torch.full((2, 1, 1), -2.0))  # 4 steps of -0.25 * 2
    torch.testing.assert_close(torch.stack(seen)[:, 0], torch.tensor([1.0, 0.75, 0.5, 0.25]))

    def guided(step):  # guidance: correct the prediction, then take the Euler step by hand
        assert step.dt == -0.25 and step.time in (1.0, 0.75, 0.5, 0.25)
        return step.x + step.dt * (step.predict(step.x) - 1.0)

    torch.testing.assert_close(euler(velocity, torch.zeros(2, 1, 1), 4, guided),
                               torch.full((2, 1, 1), -1.0))


def test_scheduler_denoise_draws_a_stochastic_schedulers_noise_from_the_generator():
    from diffusers import DDPMScheduler

    def predict(x, k):
        return torch.zeros_like(x)

    def run(seed):
        scheduler = DDPMScheduler(num_train_timesteps=10)
        return scheduler_denoise(predict, torch.ones(2, 1, 3), scheduler, 5,
                                 generator=torch.Generator().manual_seed(seed))

    state = torch.random.get_rng_state()
    assert torch.equal(run(0), run(0)) and not torch.allclose(run(0), run(1))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("build", [_flow, _diffusion])
def test_training_noise_and_time_can_be_given(build):
    model = build().train()
    inputs = _inputs()
    b = inputs.input_ids.shape[0]
    noise = torch.randn(b, CHUNK, ADIM, generator=torch.Generator().manual_seed(3))
    is_flow = "Flow" in type(model.head).__name__
    time = torch.tensor([0.2, 0.5, 0.9]) if is_flow else torch.tensor([1, 20, 40])
    given = Sampling(noise=noise, time=time)
    a, b_ = model(inputs, sampling=given).loss, model(inputs, sampling=given).loss
    assert torch.equal(a, b_)
    other = model(inputs, sampling=Sampling(noise=noise, time=time.flip(0))).loss
    assert not torch.equal(a, other)
    seeded = model(inputs, sampling=_seeded(7)).loss
    assert torch.equal(seeded, model(inputs, sampling=_seeded(7)).loss)
    # the flow target by hand: x_t = t eps + (1 - t) a, target eps - a
    if is_flow:
        head = model.head
        actions = _normalize(model, inputs.actions)
        tokens, target = head.training_tokens(actions, given, torch.float32)
        torch.testing.assert_close(target, noise - actions)
        x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
        torch.testing.assert_close(tokens.action_embeds, head.embed_actions(x_t, time))


def test_bad_sampling_is_refused_with_the_reason():
    flow, l1 = _flow(), _model("l1")
    inputs = _inputs(actions=False)
    with pytest.raises(ValueError, match=r"Sampling.noise has shape \(3, 2, 2\), expected"):
        flow.predict_action(inputs, Sampling(noise=torch.zeros(3, 2, 2)))
    with pytest.raises(ValueError, match="training draws"):
        flow.predict_action(inputs, Sampling(time=torch.ones(3)))
    with pytest.raises(ValueError, match="deterministic .* noise"):
        l1.predict_action(inputs, Sampling(noise=torch.zeros(3, CHUNK, ADIM)))
    # a generator is accepted by a deterministic head: it draws nothing from it
    l1.predict_action(inputs, _seeded(0))
    with pytest.raises(TypeError, match="generator"):
        Sampling(generator=0)
    with pytest.raises(TypeError, match="Sampling"):
        flow.predict_action(inputs, 4)
    with pytest.raises(ValueError, match="step wrapper must return the next sample"):
        flow.predict_action(inputs, Sampling(step_wrapper=lambda step: None))
    with pytest.raises(ValueError, match="prediction only"):
        flow.train()(_inputs(), sampling=Sampling(num_samples=2))
    if torch.cuda.is_available():  # pragma: no cover - CPU here
        with pytest.raises(ValueError, match="Sampling.generator is on"):
            flow.predict_action(inputs, Sampling(generator=torch.Generator("cuda")))


def test_training_time_takes_the_given_times_or_draws_them():
    from vlakit.heads import Sampling, flow_training_time, training_time

    given = torch.tensor([0.2, 0.7], dtype=torch.float64)
    got = training_time(Sampling(time=given), 2, torch.device("cpu"))
    assert got.dtype == torch.float32 and torch.equal(got, given.float())
    drawn = training_time(Sampling(generator=torch.Generator().manual_seed(3)), 2,
                          torch.device("cpu"))
    assert torch.equal(drawn, flow_training_time(2, torch.device("cpu"),
                                                 torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match=r"Sampling.time must be \[batch=3\]"):
        training_time(Sampling(time=given), 3, torch.device("cpu"))
