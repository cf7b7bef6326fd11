"""Flow matching (pi0's recipe) on the action slots of any assembly."""

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core import TokenSequence
from vlakit.core.recording import recorded
from vlakit.heads._steps import StepRunner
from vlakit.heads.base import HeadTokens, ModelRunner, action_loss_mean, has_action_targets
from vlakit.heads.sampling import Sampling, draw_noise, euler, training_noise, training_time
from vlakit.heads.slots import read_slots
from vlakit.heads.time_embedding import sincos_time_embedding

__all__ = ["FlowMatchingHead"]

FLOW_LAYOUTS = ("cached", "full")


@recorded
class FlowMatchingHead(nn.Module):
    """Actions from a learned velocity field, integrated from noise in a fixed number of
    Euler steps (pi0).

    - place: one token per chunk step, ``[b, chunk, d]``: ``action_in_proj(x_t)`` and the
      time embedding (sin/cos, periods 4e-3..4) concatenated, then
      ``action_time_mlp_out(swish(action_time_mlp_in(.)))`` (pi0's action-time MLP).
      Training samples ``t ~ Beta(1.5, 1) * 0.999 + 0.001`` per example, noise
      ``eps ~ N(0, 1)``, and ``x_t = t eps + (1 - t) a``.
    - reads: the final hidden state of each action token (``read="slot"``, pi0) or the one
      before it (``"previous"``), through ``action_out_proj`` to a velocity ``[b, chunk, a]``.
    - loss: mean squared error against ``eps - a`` (float32).
    - predict: ``x = eps`` at ``t = 1``, then [euler][vlakit.heads.euler]: ``num_steps``
      steps of ``x += dt v(x, t)`` with ``dt = -1 / num_steps`` and ``t = 1 + k dt`` (a fixed
      count, no host reads); the velocity is
      [velocity_at][vlakit.heads.FlowMatchingHead.velocity_at] over the runner's suffix
      pass. Randomness comes from [Sampling][vlakit.heads.Sampling] (generator or given
      noise; never the global random state).

    Layouts: ``"cached"`` (default) encodes images, proprio and prompt once into a read-only
    KV cache and runs only the action tokens per step; it needs a mask policy that keeps the
    prefix blind to the suffix ([CausalMask][vlakit.core.CausalMask],
    [ParallelDecodingMask][vlakit.core.ParallelDecodingMask], ...) and vlakit's decoder (with
    ``HFDecoder`` it falls back to ``"full"`` and warns once). ``"full"`` re-runs the whole
    sequence per step (any mask, e.g. OFT's bidirectional one).

    Args:
        hidden_size: the decoder's width ``d``.
        action_dim: action dimensions ``a``.
        chunk_size: actions per prediction (one token each).
        num_steps: Euler steps at inference (pi0: 10).
        layout: ``"cached"`` or ``"full"``.
        read: ``"slot"`` (pi0) or ``"previous"``.
        min_period: the time embedding's shortest period.
        max_period: its longest period.
    """

    def __init__(
        self,
        hidden_size: int,
        action_dim: int,
        chunk_size: int,
        num_steps: int = 10,
        layout: str = "cached",
        read: str = "slot",
        min_period: float = 4e-3,
        max_period: float = 4.0,
    ) -> None:
        super().__init__()
        if layout not in FLOW_LAYOUTS:
            raise ValueError(f"layout must be one of {FLOW_LAYOUTS}, got {layout!r}")
        if read not in ("previous", "slot"):
            raise ValueError(f"read must be 'previous' or 'slot', got {read!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.hidden_size, self.action_dim, self.chunk_size = hidden_size, action_dim, chunk_size
        self.num_steps, self.layout, self.read = num_steps, layout, read
        self.min_period, self.max_period = min_period, max_period
        self.action_in_proj = nn.Linear(action_dim, hidden_size)
        self.action_time_mlp_in = nn.Linear(2 * hidden_size, hidden_size)
        self.action_time_mlp_out = nn.Linear(hidden_size, hidden_size)
        self.action_out_proj = nn.Linear(hidden_size, action_dim)

    @property
    def num_action_tokens(self) -> int:
        """Tokens per example: one per chunk step."""
        return self.chunk_size

    def has_targets(self, inputs: Any) -> bool:
        return has_action_targets(inputs)

    def embed_actions(
        self, x: Float[Tensor, "b c a"], t: Float[Tensor, " b"]
    ) -> Float[Tensor, "b c d"]:
        """Action tokens for noisy actions ``x`` at time ``t`` (pi0's action-time MLP)."""
        dtype = self.action_in_proj.weight.dtype
        actions = self.action_in_proj(x.to(dtype))  # [b, c, d]
        time = sincos_time_embedding(t, self.hidden_size, self.min_period, self.max_period)
        time = time.to(dtype)[:, None].expand_as(actions)  # [b, c, d]
        mixed = self.action_time_mlp_in(torch.cat((actions, time), dim=-1))
        return self.action_time_mlp_out(F.silu(mixed))

    def velocity(
        self, hidden: Float[Tensor, "b n d"], seq: TokenSequence
    ) -> Float[Tensor, "b c a"]:
        """The predicted velocity ``[b, chunk, a]`` (float32) from the final hidden states."""
        slots = read_slots(hidden, seq, self.chunk_size, self.read, type(self).__name__)
        proj = self.action_out_proj
        return proj(slots.to(proj.weight.dtype)).to(torch.float32)

    def training_tokens(
        self, actions: Float[Tensor, "b c a"], sampling: Sampling, dtype: torch.dtype
    ) -> tuple[HeadTokens, Float[Tensor, "b c a"]]:
        """Tokens of ``x_t = t eps + (1 - t) a`` and the target velocity ``eps - a``; ``t``
        and ``eps`` from ``sampling`` (given, or drawn: its generator, else torch's)."""
        sampling.check_training(type(self).__name__)
        actions = actions.to(torch.float32)
        b, device = actions.shape[0], actions.device
        t = training_time(sampling, b, device)
        noise = training_noise(actions, sampling)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        return HeadTokens(action_embeds=self.embed_actions(x_t, t).to(dtype)), noise - actions

    def loss(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, ""]:
        """Mean squared error between the predicted and the target velocity (one pass
        over the whole sequence with the noisy action tokens)."""
        tokens, target = self.training_tokens(runner.target_actions(), sampling, runner.dtype)
        hidden, seq = runner.run(tokens)
        errors = (self.velocity(hidden, seq) - target).square()  # [b, c, a]
        return action_loss_mean(errors, runner.target_is_pad())

    def velocity_at(self, steps: StepRunner):
        """The velocity closure ``(x [B, c, a], t [B]) -> v [B, c, a]`` over one step's
        suffix pass (or full pass) of ``steps``."""

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            tokens = HeadTokens(action_embeds=self.embed_actions(x, t).to(steps.dtype))
            hidden, seq = steps(tokens)
            return self.velocity(hidden, seq)

        return velocity

    def predict(
        self, runner: ModelRunner, sampling: Sampling
    ) -> Float[Tensor, "b c a"] | Float[Tensor, "b n c a"]:
        """Integrate from noise with [euler][vlakit.heads.euler]: normalised actions
        ``[b, chunk, a]``, or ``[b, num_samples, chunk, a]`` when ``sampling.num_samples``
        is given (one prefix shared by the samples)."""
        sampling.check_prediction(type(self).__name__)
        n = 1 if sampling.num_samples is None else sampling.num_samples
        steps = StepRunner(self, runner, n, self.layout == "cached", self.chunk_size)
        b, c, a = runner.batch_size, self.chunk_size, self.action_dim
        shape = (b, c, a) if sampling.num_samples is None else (b, n, c, a)
        noise = draw_noise(shape, steps.device, sampling).reshape(b * n, c, a)
        x = euler(self.velocity_at(steps), noise, self.num_steps, sampling.step_wrapper)
        return x.view(shape)

    def extra_repr(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, action_dim={self.action_dim}, "
            f"num_steps={self.num_steps}, layout={self.layout!r}, read={self.read!r}"
        )
