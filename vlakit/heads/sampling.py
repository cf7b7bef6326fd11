"""Samplers as free functions, and sampling as a typed argument.

The iterative heads (flow matching, diffusion) do not own a loop: they hand a closure for
what the model predicts at one noisy sample (a velocity, or a noise estimate) to one of the
two samplers here, torchtitan's habit (Flux keeps ``denoise()`` beside a model that only has
``forward``):

- [euler][vlakit.heads.euler]: the fixed-step Euler integration of a velocity field from
  ``t = 1`` (noise) to ``t = 0`` (pi0's convention);
- [scheduler_denoise][vlakit.heads.scheduler_denoise]: a diffusers scheduler's timesteps,
  each step the scheduler's own ``step`` arithmetic (OpenVLA-OFT's DDIM).

Every step goes through an optional **step wrapper**
([StepWrapper][vlakit.heads.StepWrapper]): it receives the step
([DenoiseStep][vlakit.heads.DenoiseStep]: index, time, the current sample, the model's
prediction closure and the plain step) and returns the next sample. Real-time chunking,
guidance and inpainting are wrappers; no head is edited for them.

[Sampling][vlakit.heads.Sampling] is what a caller passes to
[VLA.predict_action][vlakit.VLA.predict_action] (and to [VLA.forward][vlakit.VLA.forward]
for training draws): the number of samples, a ``torch.Generator`` or the explicit initial
noise, and the step wrapper. Nothing here draws from torch's global random state: without a
generator or noise, a fresh generator seeded from the operating system's entropy is used.

Both samplers have fixed step counts and read nothing back from the device, so compiled
model calls inside them keep their graphs.
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "Sampling",
    "DenoiseStep",
    "StepWrapper",
    "euler",
    "scheduler_denoise",
    "draw_noise",
    "training_noise",
    "flow_training_time",
    "training_time",
    "prediction_generator",
    "rowwise",
]

PredictFn = Callable[[Tensor, Tensor], Tensor]
"""``(x [B, c, a] float32, t [B]) -> prediction [B, c, a] float32``: a velocity (flow) or a
noise estimate (diffusion) of the model at sample ``x`` and time / timestep ``t``."""


@dataclasses.dataclass(frozen=True)
class DenoiseStep:
    """One denoising step, as a [StepWrapper][vlakit.heads.StepWrapper] sees it.

    Attributes:
        index: ``k`` in ``0 .. num_steps - 1``.
        num_steps: the fixed number of steps.
        time: flow: the time ``t`` of ``x`` (1 is noise, 0 the data); diffusion: the
            scheduler's timestep ``k``.
        dt: flow: the Euler step ``-1 / num_steps``; diffusion: ``None``.
        x: ``[B, chunk, a]`` the current sample (float32).
        predict: ``x -> [B, chunk, a]``: the model's velocity (flow) or noise estimate
            (diffusion) at this step's time, for any sample ``x`` (autograd works through it
            when gradients are enabled, e.g. for guidance).
        run: ``x -> next x``: the plain step (Euler, or the scheduler's ``step``) from any
            sample ``x``.
    """

    index: int
    num_steps: int
    time: float
    dt: float | None
    x: Float[Tensor, "B c a"]
    predict: Callable[[Tensor], Tensor]
    run: Callable[[Tensor], Tensor]


@runtime_checkable
class StepWrapper(Protocol):
    """Wraps every denoising step: ``wrapper(step) -> next x`` ``[B, chunk, a]``.

    The plain step is ``step.run(step.x)``. A wrapper may change the sample before it
    (inpainting: ``step.run(w * prev + (1 - w) * step.x)``), correct the prediction
    (guidance: through ``step.predict``), or record what it sees.
    """

    def __call__(self, step: DenoiseStep) -> Float[Tensor, "B c a"]:
        ...


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a sampling head draws: given to ``predict_action`` (and to ``forward`` for the
    training draws).

    Attributes:
        num_samples: chunks drawn per example from one shared prefix; ``predict_action``
            then returns ``[b, num_samples, chunk, a]``. ``None``: one, ``[b, chunk, a]``.
        generator: the ``torch.Generator`` every draw uses (on the model's device), or a
            sequence of them, one per example: each row then draws from its own generator
            only, so a row predicted alone with ``generator=g`` equals the same row inside a
            batch given ``[..., g, ...]`` (batching is invisible to the result). The same
            generator state gives bit-identical actions.
        noise: the initial noise, normalised action space: ``[b, chunk, a]`` (or
            ``[b, num_samples, chunk, a]``) at prediction; in training the noise the head
            mixes into the targets, ``[b, chunk, a]``.
        time: training only: the flow time ``[b]`` in ``(0, 1]`` (flow matching) or the
            integer diffusion timesteps ``[b]`` (diffusion) instead of drawing them.
        step_wrapper: wraps every denoising step ([StepWrapper][vlakit.heads.StepWrapper]):
            real-time chunking (a wrapper holding the previous chunk and the inference
            delay), guidance, inpainting, recording.

    Deterministic heads (discrete tokens, L1 regression) accept a generator (they draw
    nothing from it, so an evaluation loop can pass one to any policy) and refuse every other
    option, which they could only ignore (see
    [check_deterministic][vlakit.heads.Sampling.check_deterministic]).
    """

    num_samples: int | None = None
    generator: torch.Generator | tuple[torch.Generator, ...] | None = None
    noise: Tensor | None = None
    time: Tensor | None = None
    step_wrapper: StepWrapper | None = None

    def __post_init__(self) -> None:
        n = self.num_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"Sampling.num_samples must be an integer >= 1 or None, got {n!r}")
        generator = self.generator
        if isinstance(generator, (list, tuple)):
            if not generator or not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError(
                    "Sampling.generator as a sequence must hold one torch.Generator per "
                    "example (and at least one)"
                )
            object.__setattr__(self, "generator", tuple(generator))
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"Sampling.generator must be a torch.Generator (or one per example), got "
                f"{type(generator).__name__}; e.g. torch.Generator(device).manual_seed(0)"
            )
        for name in ("noise", "time"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"Sampling.{name} must be a torch.Tensor, got "
                                f"{type(value).__name__}")
        if self.noise is not None and not self.noise.is_floating_point():
            raise ValueError(f"Sampling.noise must be floating point, got {self.noise.dtype}")
        if self.step_wrapper is not None and not callable(self.step_wrapper):
            raise TypeError("Sampling.step_wrapper must be callable: wrapper(step) -> next x")

    @property
    def is_default(self) -> bool:
        """Nothing asked for: one sample, fresh randomness, plain steps."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def check_deterministic(self, head: str) -> None:
        """Raise a ``ValueError`` if anything but a generator is asked of a head that draws
        nothing."""
        asked = [f.name for f in dataclasses.fields(self)
                 if f.name != "generator" and getattr(self, f.name) is not None]
        if asked:
            raise ValueError(
                f"{head} is deterministic and draws nothing, but Sampling sets "
                f"{', '.join(asked)}; sampling options are for sampling heads "
                f"(DiffusionActionHead, FlowMatchingHead)"
            )

    def check_prediction(self, head: str) -> None:
        """Raise if a training-only field is set at prediction."""
        if self.time is not None:
            raise ValueError(
                f"Sampling.time is for training draws; {head} predicts from t = 1 (noise) "
                f"through its fixed steps; leave time unset at prediction"
            )

    def check_training(self, head: str) -> None:
        """Raise if a prediction-only field is set in training."""
        for name in ("num_samples", "step_wrapper"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"Sampling.{name} applies to prediction only; {head}'s training loss "
                    f"draws one noise and time per example (set noise, time or generator)"
                )


Generators = torch.Generator | tuple[torch.Generator, ...]
"""One generator for the whole batch, or one per example (row)."""


def rowwise(
    draw: Callable[[tuple[int, ...], torch.Generator | None], Tensor],
    shape: tuple[int, ...],
    generator: Generators | None,
) -> Tensor:
    """``draw(shape, generator)``, or, with one generator per row (a tuple of
    ``shape[0]``), each row ``draw(shape[1:], generator[i])`` stacked: row ``i`` then
    depends on its own generator only."""
    if not isinstance(generator, tuple):
        return draw(shape, generator)
    if len(generator) != shape[0]:
        raise ValueError(
            f"Sampling.generator holds {len(generator)} generators but the batch has "
            f"{shape[0]} examples; give one generator per example, or a single one"
        )
    return torch.stack([draw(shape[1:], g) for g in generator])


def _check_device(generator: torch.Generator, device: torch.device) -> None:
    if generator.device.type != torch.device(device).type:
        raise ValueError(
            f"Sampling.generator is on {generator.device} but the model runs on {device}; "
            f"make it there: torch.Generator({str(device)!r}).manual_seed(seed)"
        )


def prediction_generator(sampling: Sampling, device: torch.device) -> Generators:
    """The generator(s) prediction draws from: ``sampling.generator`` (checked to be on
    ``device``'s type), else a fresh one seeded from the operating system's entropy (never
    torch's global random state)."""
    generator = sampling.generator
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
        return generator
    for g in generator if isinstance(generator, tuple) else (generator,):
        _check_device(g, device)
    return generator


def draw_noise(
    shape: tuple[int, ...],
    device: torch.device,
    sampling: Sampling,
    what: str = "Sampling.noise",
) -> Float[Tensor, "..."]:
    """``sampling.noise`` checked against ``shape`` (float32 on ``device``), or standard
    normal noise of ``shape`` from [prediction_generator][vlakit.heads.prediction_generator]
    (one generator per row: each row from its own)."""
    if sampling.noise is not None:
        if tuple(sampling.noise.shape) != tuple(shape):
            raise ValueError(
                f"{what} has shape {tuple(sampling.noise.shape)}, expected {tuple(shape)} "
                f"([batch, chunk, action_dim], or [batch, num_samples, chunk, action_dim] "
                f"with num_samples)"
            )
        return sampling.noise.to(device=device, dtype=torch.float32)
    generator = prediction_generator(sampling, device)
    return rowwise(lambda s, g: torch.randn(s, generator=g, device=device, dtype=torch.float32),
                   tuple(shape), generator)


def training_noise(actions: Float[Tensor, "b c a"], sampling: Sampling) -> Float[Tensor, "b c a"]:
    """The noise a training draw mixes into ``actions``: ``sampling.noise`` (checked against
    their shape), else standard normal noise from ``sampling.generator`` (one per row, or
    one for all), else from torch's global random state (as the reference training loops
    draw it)."""
    if sampling.noise is not None:
        return draw_noise(tuple(actions.shape), actions.device, sampling)
    if sampling.generator is not None:
        return rowwise(lambda s, g: torch.randn(s, generator=g, device=actions.device),
                       tuple(actions.shape), sampling.generator)
    return torch.randn_like(actions)


def flow_training_time(
    batch: int, device: torch.device, generator: Generators | None = None
) -> Float[Tensor, " b"]:
    """pi0's flow-matching training times ``Beta(1.5, 1) * 0.999 + 0.001`` ``[b]`` (float32):
    torch's ``Beta`` sampler from the global random state without a generator (as openpi and
    LeRobot draw them); with one (or one per row), the same distribution as
    ``u ** (1 / 1.5)``, ``u ~ U(0, 1)`` from it."""
    if generator is None:
        beta = torch.distributions.Beta(
            torch.tensor(1.5, device=device), torch.tensor(1.0, device=device)
        )
        draw = beta.sample((batch,)).to(torch.float32)
    else:
        u = rowwise(lambda s, g: torch.rand(s, generator=g, device=device, dtype=torch.float32),
                    (batch,), generator)
        draw = u.pow(1.0 / 1.5)
    return draw * 0.999 + 0.001


def training_time(sampling: Sampling, batch: int, device: torch.device) -> Float[Tensor, " b"]:
    """A flow head's training times ``[b]`` (float32, on ``device``): ``sampling.time`` when
    given (its shape checked), else [flow_training_time][vlakit.heads.flow_training_time]
    from ``sampling.generator``."""
    t = sampling.time
    if t is None:
        return flow_training_time(batch, device, sampling.generator)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"Sampling.time must be [batch={batch}] flow times, got shape "
                         f"{tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _wrapped(wrapper: StepWrapper | None, step: DenoiseStep) -> Tensor:
    if wrapper is None:
        return step.run(step.x)
    x = wrapper(step)
    if not isinstance(x, Tensor) or x.shape != step.x.shape:
        raise ValueError(
            f"the step wrapper must return the next sample, a tensor of shape "
            f"{tuple(step.x.shape)}, got {type(x).__name__}"
            + (f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else "")
        )
    return x


def euler(
    velocity: PredictFn,
    noise: Float[Tensor, "B c a"],
    num_steps: int,
    step_wrapper: StepWrapper | None = None,
) -> Float[Tensor, "B c a"]:
    """Integrate a velocity field from ``t = 1`` (``x = noise``) to ``t = 0`` in
    ``num_steps`` Euler steps: ``x += dt * velocity(x, t)`` with ``dt = -1 / num_steps`` and
    ``t = 1 + k dt`` for ``k = 0 .. num_steps - 1`` (pi0's convention: t = 1 is noise).

    Args:
        velocity: ``(x [B, c, a], t [B] float32) -> v [B, c, a]``.
        noise: ``[B, c, a]`` the starting sample.
        num_steps: a fixed count (no host reads, no early exit).
        step_wrapper: wraps each step (see [StepWrapper][vlakit.heads.StepWrapper]).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    x = noise
    batch, device = x.shape[0], x.device
    dt = -1.0 / num_steps
    for k in range(num_steps):
        time = 1.0 + k * dt
        t = torch.full((batch,), time, device=device, dtype=torch.float32)

        def predict(sample: Tensor, t: Tensor = t) -> Tensor:
            return velocity(sample, t)

        def run(sample: Tensor, predict: Callable[[Tensor], Tensor] = predict) -> Tensor:
            return sample + dt * predict(sample)

        x = _wrapped(step_wrapper, DenoiseStep(k, num_steps, time, dt, x, predict, run))
    return x


def _step_takes_generator(scheduler: Any) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def scheduler_denoise(
    noise_prediction: PredictFn,
    noise: Float[Tensor, "B c a"],
    scheduler: Any,
    num_inference_steps: int,
    step_wrapper: StepWrapper | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Float[Tensor, "B c a"]:
    """Denoise with a diffusers scheduler: for each of its ``num_inference_steps``
    timesteps ``k``, ``x = scheduler.step(eps_hat(x, k), k, x).prev_sample``.

    The timesteps are read to host ints once, before the loop (no device reads inside it).
    A stochastic scheduler (DDPM, DDIM with ``eta > 0``) draws its step noise from
    ``generator``; a scheduler whose ``step`` takes no generator must draw nothing.

    Args:
        noise_prediction: ``(x [B, c, a], timesteps [B] long) -> eps_hat [B, c, a]``.
        noise: ``[B, c, a]`` the starting sample.
        scheduler: a diffusers scheduler (``set_timesteps`` is called on it).
        num_inference_steps: the fixed number of steps.
        step_wrapper: wraps each step (see [StepWrapper][vlakit.heads.StepWrapper]).
        generator: passed to ``scheduler.step`` when it takes one (diffusers takes one
            generator, or a list with one per row of ``x``).
    """
    scheduler.set_timesteps(num_inference_steps)
    options = {"generator": generator} if _step_takes_generator(scheduler) else {}
    x = noise
    batch, device = x.shape[0], x.device
    timesteps = scheduler.timesteps.tolist()  # host ints: no device reads in the loop
    for index, k in enumerate(timesteps):
        ks = torch.full((batch,), k, device=device)

        def predict(sample: Tensor, ks: Tensor = ks) -> Tensor:
            return noise_prediction(sample, ks)

        def run(sample: Tensor, k: int = k, predict: Callable = predict) -> Tensor:
            return scheduler.step(predict(sample), k, sample, **options).prev_sample

        step = DenoiseStep(index, len(timesteps), float(k), None, x, predict, run)
        x = _wrapped(step_wrapper, step)
    return x
