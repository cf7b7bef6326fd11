"""Real-time chunking (Black et al. 2025, "Real-Time Execution of Action Chunking Flow
Policies") as step wrappers: any iterative head, through the shared samplers, no head edited.

While a robot executes the current chunk, the next one is being sampled; by the time it is
ready, ``d`` more actions of the current chunk have run (the inference delay, in control
steps). Real-time chunking samples the next chunk *consistent with what will still execute*:
the previous chunk's unexecuted actions, shifted to the new chunk's start. Knobs, named as
in the paper:

- ``H``: the chunk length (the head's ``chunk_size``; read from the sample ``[B, H, a]``);
- ``d``: the inference delay: the new chunk's first ``d`` actions are the previous chunk's
  (they execute while the new chunk is computed);
- ``s``: the execution horizon: actions executed from a chunk before switching to the next;
  ``d <= s <= H - d``. The previous chunk's leftover is then ``H - s`` actions long.

Two forms, both [StepWrapper][vlakit.heads.StepWrapper]s given as
``Sampling(step_wrapper=...)`` to [VLA.predict_action][vlakit.VLA.predict_action]:

- [GuidedRTC][vlakit.heads.GuidedRTC]: the paper's guided (pi-GDM) inpainting: soft prefix
  weights ([prefix_weights][vlakit.heads.prefix_weights]) and a vector-Jacobian product
  through the denoiser every step; flow heads ([euler][vlakit.heads.euler]).
- [InpaintRTC][vlakit.heads.InpaintRTC]: GR00T N1.7's inpainting without gradients: the
  overlap starts from the previous actions, frozen steps never move, a ramp lets the rest of
  the overlap move progressively more; flow and diffusion heads.

The previous chunk is given in the head's **normalised** action space (what
``predict_action(..., unnormalize=False)`` returns); pass ``normalizer=model.action_normalizer``
to give raw actions instead (normalised once, when the wrapper is built). Without a previous
chunk (``prev_chunk=None``, the first chunk of an episode) both wrappers take exactly the
plain step.

Names elsewhere (the same three numbers; a table is on the documentation's real-time
chunking page):

- the kinetix reference: ``action_chunk_size`` = H, ``inference_delay`` = d,
  ``execute_horizon`` = s, ``prefix_attention_horizon`` = H - s;
- LeRobot (``RTCConfig``, ``RTCProcessor.denoise_step``): ``inference_delay`` = d,
  ``execution_horizon`` = **H - s** (where the soft mask ends, not the paper's ``s``);
- openpi forks' observation keys: ``rtc/inference_delay`` = d,
  ``rtc/prefix_attention_horizon`` = H - s, ``rtc/prefix_attention_schedule``,
  ``rtc/max_guidance_weight``, ``rtc/prev_chunk`` (the previous chunk);
- GR00T N1.7 (``get_action`` options): ``action_horizon`` = H, ``rtc_frozen_steps`` = d,
  ``rtc_overlap_steps`` = the leftover's length (H - s), ``rtc_ramp_rate``.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from vlakit.heads.sampling import DenoiseStep

__all__ = [
    "PREFIX_SCHEDULES",
    "prefix_weights",
    "inpaint_weights",
    "guidance_weight",
    "GuidedRTC",
    "InpaintRTC",
]

PREFIX_SCHEDULES = ("linear", "exp", "ones", "zeros")
"""The prefix-weight schedules of the kinetix reference and LeRobot, by name."""


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer (control steps), got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_rtc(delay: int, execution_horizon: int, chunk: int) -> None:
    """``0 <= d <= s <= H - d``, every failure naming d, s and H."""
    d = _check_count("delay d", delay)
    s = _check_count("execution_horizon s", execution_horizon)
    H = _check_count("chunk H", chunk)  # noqa: N806
    if H < 1:
        raise ValueError(f"chunk H must be >= 1, got H={H}")
    if not d <= s <= H - d:
        why = (f"the delay d={d} exceeds the execution horizon s={s} (the d actions that run "
               f"during inference must be among the s executed)" if d > s else
               f"s={s} > H - d = {H - d}: the previous chunk's leftover H - s={H - s} does "
               f"not cover the d={d} actions that run during inference")
        raise ValueError(
            f"real-time chunking needs d <= s <= H - d (delay d, execution_horizon s, chunk "
            f"H), got d={d}, s={s}, H={H}: {why}"
        )


def _soft_weights(start: int, end: int, total: int, schedule: str) -> Tensor:
    """``[total]`` float64: 1 before ``start``, the schedule from ``start`` to ``end``
    (exclusive), 0 from ``end`` on (``start <= end <= total``)."""
    if schedule not in PREFIX_SCHEDULES:
        raise ValueError(f"schedule must be one of {PREFIX_SCHEDULES}, got {schedule!r}")
    i = torch.arange(total, dtype=torch.float64)
    if schedule == "ones":
        w = torch.ones(total, dtype=torch.float64)
    elif schedule == "zeros":
        w = (i < start).to(torch.float64)
    else:  # c_i = (end - i) / (end - start + 1), 1 before start (clamped), 0 from end on
        w = ((end - i) / (end - start + 1)).clamp(0.0, 1.0)
        if schedule == "exp":
            w = w * torch.expm1(w) / (math.e - 1)
    return torch.where(i < end, w, torch.zeros_like(w))


def prefix_weights(
    delay: int, execution_horizon: int, chunk: int, schedule: str = "exp"
) -> Float[Tensor, " H"]:
    """The paper's prefix weights ``W`` ``[H]`` (float32, on the CPU): how strongly each
    step of the new chunk is pulled towards the previous chunk's leftover.

    ``W_i = 1`` for ``i < d``; for ``d <= i < H - s`` the schedule of
    ``c_i = (H - s - i) / (H - s - d + 1)``: ``"linear"`` ``c_i``, ``"exp"``
    ``c_i (e^{c_i} - 1) / (e - 1)``; ``W_i = 0`` for ``i >= H - s``. ``"ones"``: 1 for
    ``i < H - s``; ``"zeros"``: 1 for ``i < d`` only (hard masking).

    Matches ``get_prefix_weights(start=d, end=H - s, total=H, schedule)`` of the paper's
    reference (Physical-Intelligence/real-time-chunking-kinetix, ``src/model.py``:
    ``clip((start - 1 - i) / (end - start + 1) + 1, 0, 1)``, the same ``c_i``) and LeRobot's
    ``RTCProcessor.get_prefix_weights(inference_delay, execution_horizon, chunk_size)``
    (``src/lerobot/policies/rtc/modeling_rtc.py``: ``linspace(1, 0, end - start + 2)[1:-1]``
    between the ones and the zeros, the same values), where LeRobot's
    ``execution_horizon`` is this ``H - s``. With ``d=2, s=4, H=10`` (the reference's
    example): linear ``[1, 1, 4/5, 3/5, 2/5, 1/5, 0, 0, 0, 0]``.

    Args:
        delay: ``d``, the inference delay in control steps.
        execution_horizon: ``s``, the steps executed before switching chunks
            (``d <= s <= H - d``).
        chunk: ``H``, the chunk length.
        schedule: ``"exp"`` (the paper's), ``"linear"``, ``"ones"`` or ``"zeros"``.
    """
    _check_rtc(delay, execution_horizon, chunk)
    return _soft_weights(delay, chunk - execution_horizon, chunk, schedule).to(torch.float32)


def _check_rate(ramp_rate: Any) -> None:
    if isinstance(ramp_rate, bool) or not isinstance(ramp_rate, (int, float)) or not (
        math.isfinite(ramp_rate) and ramp_rate > 0
    ):
        raise ValueError(f"ramp_rate must be a finite number > 0, got {ramp_rate!r}")


def inpaint_weights(
    frozen: int, overlap: int, chunk: int, ramp_rate: float | int = 5.0
) -> Float[Tensor, " H"]:
    """GR00T N1.7's inpainting weights ``w`` ``[H]`` (float32, on the CPU): the part of each
    step the sample keeps rather than takes from the plain step.

    ``w_i = 1`` on the frozen steps ``i < frozen``; over the rest of the overlap,
    ``frozen <= i < overlap`` with ``j = i - frozen + 1`` of ``m = overlap - frozen``,
    ``w_i = 1 - (1 - e^{-r j / (m + 1)}) / (1 - e^{-r})`` (one minus the normalised ramp,
    from near 1 down towards 0); ``w_i = 0`` from ``overlap`` on. GR00T's
    ``Gr00tN1d7ActionHead.get_action_with_features`` scales each Euler velocity by
    ``1 - w`` (its ``vel_strength``).

    Args:
        frozen: steps that keep the previous actions exactly (``d``, GR00T's
            ``rtc_frozen_steps``).
        overlap: steps that start from the previous actions (the leftover's length, ``H - s``;
            GR00T's ``rtc_overlap_steps``); ``frozen <= overlap <= H``.
        chunk: ``H``.
        ramp_rate: ``r > 0`` (GR00T's ``rtc_ramp_rate``, default 5): larger moves the ramp's
            steps sooner towards free.
    """
    frozen = _check_count("frozen", frozen)
    overlap = _check_count("overlap", overlap)
    chunk = _check_count("chunk H", chunk)
    if not frozen <= overlap <= chunk:
        raise ValueError(
            f"inpainting needs frozen <= overlap <= H (chunk), got frozen={frozen}, "
            f"overlap={overlap}, H={chunk}"
        )
    _check_rate(ramp_rate)
    w = torch.zeros(chunk, dtype=torch.float64)
    w[:frozen] = 1.0
    m = overlap - frozen
    if m:
        u = torch.arange(1, m + 1, dtype=torch.float64) / (m + 1)
        w[frozen:overlap] = 1.0 - torch.expm1(-ramp_rate * u) / math.expm1(-ramp_rate)
    return w.to(torch.float32)


def guidance_weight(time: float | int, max_guidance_weight: float | int) -> float:
    """The paper's guidance weight at flow time ``t`` (pi0's convention, ``t = 1`` noise),
    ``tau = 1 - t`` (the paper's, ``tau = 0`` noise):
    ``min(beta, (1 - tau) / tau * ((1 - tau)^2 + tau^2) / (1 - tau)^2)``.

    The expression equals ``(tau^2 + (1 - tau)^2) / (tau (1 - tau))``, symmetric in
    ``tau <-> 1 - tau``, so the two time conventions give the same weight; it is infinite at
    both ends, where ``beta`` applies (at ``t = 1``, the first Euler step, as the kinetix
    reference's ``nan_to_num(posinf=beta)`` gives; ``t = 0`` is never evaluated).
    """
    tau = 1.0 - float(time)
    if tau <= 0.0 or tau >= 1.0:
        return float(max_guidance_weight)
    c = (1.0 - tau) / tau
    inv_r2 = ((1.0 - tau) ** 2 + tau**2) / (1.0 - tau) ** 2
    return float(min(max_guidance_weight, c * inv_r2))


def _previous(prev_chunk: Any, normalizer: Any, what: str) -> Tensor | None:
    if prev_chunk is None:
        return None
    if not isinstance(prev_chunk, Tensor):
        raise TypeError(f"{what}: prev_chunk must be a torch.Tensor [b, k, a] or None, got "
                        f"{type(prev_chunk).__name__}")
    if prev_chunk.ndim != 3 or not prev_chunk.is_floating_point():
        raise ValueError(
            f"{what}: prev_chunk must be a floating-point [batch, k, action_dim] tensor (the "
            f"previous chunk's unexecuted actions), got {prev_chunk.dtype} of shape "
            f"{tuple(prev_chunk.shape)}"
        )
    prev = prev_chunk.detach()
    if normalizer is not None:
        with torch.no_grad():
            prev = normalizer.normalize(prev)
    prev = prev.to(torch.float32)
    if not bool(torch.isfinite(prev).all()):
        raise ValueError(f"{what}: prev_chunk holds non-finite values")
    return prev


def _aligned(prev: Tensor, x: Tensor, what: str) -> Tensor:
    """``prev [b, k, a']`` as ``x``'s ``[B, H, a]``: rows repeated for ``num_samples``
    (``B = b n``, row ``i n + j`` is example ``i``), zero-padded to ``H`` steps and ``a``
    dimensions."""
    B, H, A = x.shape  # noqa: N806
    b, k, a = prev.shape
    if k > H:
        raise ValueError(f"{what}: prev_chunk holds k={k} actions, more than the chunk H={H}; "
                         f"give the previous chunk's unexecuted actions (at most H)")
    if a > A:
        raise ValueError(f"{what}: prev_chunk has {a} action dimensions, the head {A}")
    if B != b:
        if B % b:
            raise ValueError(f"{what}: prev_chunk has {b} rows but the sample has {B} (batch "
                             f"x num_samples); give one previous chunk per example")
        prev = prev.repeat_interleave(B // b, dim=0)
    return F.pad(prev.to(device=x.device, dtype=x.dtype), (0, A - a, 0, H - k))


class GuidedRTC:
    """Guided real-time chunking (the paper's guided inpainting, pi-GDM), a
    [StepWrapper][vlakit.heads.StepWrapper] for flow-matching heads.

    In pi0's convention (``t = 1`` noise, ``x_t = t eps + (1 - t) a``, velocity
    ``v = eps - a``, Euler ``dt = -1 / num_steps``), every step at time ``t``:

    1. ``a_hat = x_t - t v(x_t)``, the clean-chunk estimate;
    2. ``err = (Y - a_hat) W``, ``Y`` the previous chunk's leftover zero-padded to
       ``[B, H, a]``, ``W`` the [prefix weights][vlakit.heads.prefix_weights];
    3. ``g = (d a_hat / d x_t)^T err``, one vector-Jacobian product through the model
       (``torch.autograd``, gradients enabled locally: this works inside
       ``predict_action``'s ``torch.no_grad``, though not under ``torch.inference_mode``;
       nothing accumulates in the weights' ``.grad``);
    4. ``v <- v - w(t) g`` with ``w(t)`` the [guidance weight][vlakit.heads.guidance_weight]
       clipped at ``max_guidance_weight``;
    5. ``x <- x_t + dt v``.

    The sign: the kinetix reference (``realtime_action``) runs ``tau`` from 0 (noise) to 1
    with velocity ``a - eps``, ``a_hat = x + (1 - tau) v`` and ``v + w g``. With
    ``tau = 1 - t`` and pi0's velocity being the negative of that one, ``a_hat`` is the same
    function of the sample, ``g`` the same, and the guided Euler step ``x + (1/N)(v_k + w g)``
    is pi0's ``x + dt (v - w g)``: LeRobot's ``denoise_step`` (pi0's convention too) has the
    same ``x1_t = x_t - time * v_t`` and ``v_t - guidance_weight * correction``.

    The leftover ``k`` may be shorter than ``H - s``: the soft weights then end at ``k``
    (``end = min(H - s, k)``, as LeRobot's ``denoise_step`` clips its ``execution_horizon``),
    so no step is pulled towards the zero padding. Extra action dimensions of the head (a
    leftover of ``a' < a`` dimensions) are pulled towards 0, as the openpi forks pad.

    Cost: the model runs with autograd every step: one forward and one backward through the
    action tokens (the prefix cache takes no gradient), about 2x a plain prediction on the
    tests' tiny CPU model and up to about 3x a plain step's compute, with the step's
    activations kept for the backward.

    Diffusion heads are refused: their steps carry a scheduler timestep and ``run``, not the
    scheduler's ``x0`` estimate, so the guidance cannot be expressed through a
    [DenoiseStep][vlakit.heads.DenoiseStep]; use [InpaintRTC][vlakit.heads.InpaintRTC].

    Args:
        prev_chunk: ``[b, k, a]`` the previous chunk's unexecuted actions, its first one
            aligned with the new chunk's first (normalised, unless ``normalizer`` is given),
            ``d <= k <= H``; ``None``: plain steps (the first chunk).
        delay: ``d``.
        execution_horizon: ``s`` (the paper's; LeRobot's ``execution_horizon`` is ``H - s``).
        schedule: the prefix weights' schedule (see
            [prefix_weights][vlakit.heads.prefix_weights]); the paper's is ``"exp"``.
        max_guidance_weight: ``beta``, the clip (default 10, LeRobot's; the kinetix
            reference's evaluation uses 5).
        normalizer: e.g. ``model.action_normalizer``: ``prev_chunk`` is then raw and is
            normalised once here (``normalize`` clips to the model's range).
    """

    def __init__(
        self,
        prev_chunk: Float[Tensor, "b k a"] | None,
        delay: int,
        execution_horizon: int,
        schedule: str = "exp",
        max_guidance_weight: float | int = 10.0,
        *,
        normalizer: Any = None,
    ) -> None:
        self.delay = _check_count("delay d", delay)
        self.execution_horizon = _check_count("execution_horizon s", execution_horizon)
        if delay > execution_horizon:
            raise ValueError(
                f"real-time chunking needs d <= s <= H - d (delay d, execution_horizon s, "
                f"chunk H), got d={delay} > s={execution_horizon}: the d actions that run "
                f"during inference must be among the s executed"
            )
        if schedule not in PREFIX_SCHEDULES:
            raise ValueError(f"schedule must be one of {PREFIX_SCHEDULES}, got {schedule!r}")
        beta = max_guidance_weight
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
            math.isfinite(beta) and beta > 0
        ):
            raise ValueError(f"max_guidance_weight must be a finite number > 0, got {beta!r}")
        self.schedule, self.max_guidance_weight = schedule, float(beta)
        self.prev_chunk = _previous(prev_chunk, normalizer, "GuidedRTC")
        if self.prev_chunk is not None and self.prev_chunk.shape[1] < self.delay:
            raise ValueError(
                f"GuidedRTC: prev_chunk holds k={self.prev_chunk.shape[1]} actions, fewer than "
                f"the delay d={self.delay}: the d actions that run during inference must come "
                f"from it"
            )

    def target(
        self, x: Float[Tensor, "B H a"]
    ) -> tuple[Float[Tensor, "B H a"], Float[Tensor, "1 H 1"]]:
        """``Y`` (the leftover, aligned and zero-padded as ``x``) and ``W`` for a sample
        ``x``; raises if ``d``, ``s`` and ``x``'s chunk ``H`` do not fit."""
        assert self.prev_chunk is not None
        H, k = x.shape[1], self.prev_chunk.shape[1]  # noqa: N806
        _check_rtc(self.delay, self.execution_horizon, H)
        y = _aligned(self.prev_chunk, x, "GuidedRTC")
        end = min(H - self.execution_horizon, k)
        w = _soft_weights(self.delay, end, H, self.schedule)
        return y, w.to(device=x.device, dtype=x.dtype)[None, :, None]

    def __call__(self, step: DenoiseStep) -> Float[Tensor, "B H a"]:
        if self.prev_chunk is None:
            return step.run(step.x)
        if step.dt is None:
            raise ValueError(
                f"GuidedRTC guides flow-matching steps (pi0's Euler sampler, DenoiseStep.dt "
                f"set); this step is a diffusion scheduler's (dt None, timestep "
                f"{step.time:g}), whose x0 estimate a DenoiseStep does not carry; use "
                f"InpaintRTC for diffusion heads"
            )
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "GuidedRTC needs autograd for its vector-Jacobian product: run prediction "
                "under torch.no_grad (as predict_action does), not torch.inference_mode"
            )
        y, w = self.target(step.x)
        t = step.time
        with torch.enable_grad():
            x = step.x.detach().requires_grad_(True)
            v = step.predict(x)
            a_hat = x - t * v
            err = ((y - a_hat) * w).detach()
            (correction,) = torch.autograd.grad(a_hat, x, err)
        beta = guidance_weight(t, self.max_guidance_weight)
        return step.x + step.dt * (v.detach() - beta * correction)

    def __repr__(self) -> str:
        k = None if self.prev_chunk is None else tuple(self.prev_chunk.shape)
        return (f"GuidedRTC(prev_chunk={k}, delay={self.delay}, execution_horizon="
                f"{self.execution_horizon}, schedule={self.schedule!r}, max_guidance_weight="
                f"{self.max_guidance_weight:g})")


class InpaintRTC:
    """Real-time chunking by inpainting, without gradients (GR00T N1.7's form), a
    [StepWrapper][vlakit.heads.StepWrapper] for flow and diffusion heads.

    With ``w`` the [inpainting weights][vlakit.heads.inpaint_weights] (1 on the frozen
    steps, a ramp over the rest of the overlap, 0 after) and ``Y`` the leftover zero-padded
    to the sample:

    - at the first step the overlap's noise is replaced by the previous actions,
      ``x[:, :overlap] = Y[:, :overlap]``;
    - every step ``x <- w x + (1 - w) run(x)``, ``run`` the plain step (Euler, or the
      scheduler's ``step``): the frozen steps never move (so the new chunk's first
      ``frozen`` actions *are* the previous chunk's, exactly), the ramp's steps move by a
      growing part of the step, the rest is sampled as usual.

    For Euler this is GR00T's ``x + dt * v * vel_strength`` with ``vel_strength = 1 - w``
    (``Gr00tN1d7ActionHead.get_action_with_features``). The wrapper does only elementwise
    arithmetic between the model's calls, so a compiled model (``compile_for_inference``)
    runs it with the graphs of plain sampling.

    Args:
        prev_chunk: ``[b, k, a]`` the previous chunk's unexecuted actions, aligned with the
            new chunk's start (normalised, unless ``normalizer`` is given); ``None``: plain
            steps.
        frozen: steps kept exactly (the delay ``d``).
        overlap: steps that start from the previous actions, ``frozen <= overlap <= k``
            (default ``k``, all of the leftover: ``H - s`` when ``s`` actions of a full
            chunk ran).
        ramp_rate: GR00T's ``rtc_ramp_rate`` (default 5).
        normalizer: e.g. ``model.action_normalizer``: ``prev_chunk`` is then raw.
    """

    def __init__(
        self,
        prev_chunk: Float[Tensor, "b k a"] | None,
        frozen: int,
        overlap: int | None = None,
        ramp_rate: float | int = 5.0,
        *,
        normalizer: Any = None,
    ) -> None:
        self.prev_chunk = _previous(prev_chunk, normalizer, "InpaintRTC")
        k = None if self.prev_chunk is None else self.prev_chunk.shape[1]
        if overlap is None:
            overlap = frozen if k is None else k
        self.frozen, self.overlap = _check_count("frozen", frozen), _check_count("overlap", overlap)
        if frozen > overlap:
            raise ValueError(f"InpaintRTC needs frozen <= overlap (<= H), got frozen={frozen}, "
                             f"overlap={overlap}")
        _check_rate(ramp_rate)
        if k is not None and overlap > k:
            raise ValueError(f"InpaintRTC: overlap={overlap} exceeds the k={k} actions of "
                             f"prev_chunk; the overlap starts from them")
        self.ramp_rate = float(ramp_rate)

    def __call__(self, step: DenoiseStep) -> Float[Tensor, "B H a"]:
        if self.prev_chunk is None:
            return step.run(step.x)
        x = step.x
        H = x.shape[1]  # noqa: N806
        if self.overlap > H:
            raise ValueError(f"InpaintRTC: overlap={self.overlap} exceeds the chunk H={H}")
        w = inpaint_weights(self.frozen, self.overlap, H, self.ramp_rate)
        w = w.to(device=x.device, dtype=x.dtype)[None, :, None]
        if step.index == 0:
            y = _aligned(self.prev_chunk, x, "InpaintRTC")
            overlap = (torch.arange(H, device=x.device) < self.overlap)[None, :, None]
            x = torch.where(overlap, y, x)
        return w * x + (1 - w) * step.run(x)

    def __repr__(self) -> str:
        k = None if self.prev_chunk is None else tuple(self.prev_chunk.shape)
        return (f"InpaintRTC(prev_chunk={k}, frozen={self.frozen}, overlap={self.overlap}, "
                f"ramp_rate={self.ramp_rate:g})")
