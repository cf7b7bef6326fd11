"""pi0 and pi0.5: flow matching through an action expert that runs against the prefix cache.

```
   prefix (images, prompt) ── main decoder ── KV cache of every layer (encoded once)
                                                   │ layer i reads layer i's keys and values
   pi0:   [state token, chunk action tokens] ── expert stack ── action_out_proj ── velocity
   pi0.5: [chunk action tokens] ── expert stack (adaptive norms <- time MLP) ── velocity
```

Both heads hold the expert (any [`LayerStack`][vlakit.decoders.LayerStack] whose attention
geometry matches the main decoder's) and pi0's projections, named as openpi and LeRobot name
them. They run the expert through the runner's prefix
([`run_suffix`][vlakit.heads.PrefixRunner.run_suffix] with ``decoder=`` the expert and, for
pi0.5, ``condition=`` the time MLP's output), in training (the prefix cache keeps its graph:
gradients reach the main decoder through its keys and values) and in prediction (the prefix
encoded once, 10 Euler steps of the expert alone against it, nothing of the prefix copied
per step). Heads import nothing of the decoders: the expert is passed in.
"""

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core import TokenRole
from vlakit.core.recording import recorded
from vlakit.heads.base import ModelRunner, PrefixRunner, action_loss_mean, has_action_targets
from vlakit.heads.sampling import (
    Sampling,
    draw_noise,
    euler,
    training_noise,
    training_time,
)
from vlakit.heads.time_embedding import sincos_time_embedding

__all__ = ["Pi0Head", "Pi05Head"]


class _ExpertFlowHead(nn.Module):
    """What pi0 and pi0.5 share: padding to ``max_dim``, the flow-matching loss and the
    Euler loop over expert passes against the prefix cache. Subclasses build the expert's
    suffix tokens ([expert_tokens][vlakit.heads.Pi0Head.expert_tokens])."""

    def _setup(
        self,
        expert: nn.Module,
        action_dim: int,
        chunk_size: int,
        num_steps: int,
        max_dim: int,
        prompt_length: int,
        min_period: float,
        max_period: float,
    ) -> int:
        name = type(self).__name__
        if action_dim < 1:
            raise ValueError(f"{name}: action_dim must be >= 1, got {action_dim}")
        if action_dim > max_dim:
            raise ValueError(
                f"{name}(action_dim={action_dim}, max_dim={max_dim}): actions are zero-padded "
                f"to max_dim, so action_dim={action_dim} does not fit in max_dim={max_dim}; "
                f"build the head with max_dim >= {action_dim}"
            )
        if chunk_size < 1 or num_steps < 1 or prompt_length < 1:
            raise ValueError(
                f"{name}: chunk_size, num_steps and prompt_length must be >= 1, got "
                f"chunk_size={chunk_size}, num_steps={num_steps}, prompt_length={prompt_length}"
            )
        width = getattr(expert, "dim", None)
        if not isinstance(width, int):
            raise TypeError(
                f"{name} takes the action expert as a layer stack with a width (.dim), e.g. "
                f"gemma_300m_stack(); got {type(expert).__name__}"
            )
        if width % 2:
            raise ValueError(
                f"{name}: the time embedding has the expert's width, which must be even; the "
                f"expert's width is {width}"
            )
        self.expert = expert
        self.action_dim, self.chunk_size, self.num_steps = action_dim, chunk_size, num_steps
        self.max_dim, self.prompt_length = max_dim, prompt_length
        self.min_period, self.max_period = min_period, max_period
        return width

    @property
    def width(self) -> int:
        """The expert's width (the action tokens' and the time embedding's)."""
        return self.expert.dim

    @property
    def num_action_tokens(self) -> int:
        """Suffix tokens the expert runs after the prefix (positions they take)."""
        return self.chunk_size

    def has_targets(self, inputs: Any) -> bool:
        return has_action_targets(inputs)

    # -- draws ------------------------------------------------------------------------------

    def _check_noise(self, sampling: Sampling, shape: tuple[int, ...]) -> None:
        noise = sampling.noise
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(
                f"Sampling.noise has shape {tuple(noise.shape)}, but {type(self).__name__} "
                f"integrates every one of the max_dim={self.max_dim} padded action dims (the "
                f"padded ones move the real ones through action_in_proj): pass noise of shape "
                f"{shape} ([batch, chunk, max_dim], or [batch, num_samples, chunk, max_dim] "
                f"with num_samples)"
            )

    # -- the expert pass --------------------------------------------------------------------

    def _state(self, runner: ModelRunner) -> Float[Tensor, "b D"] | None:
        return None

    def expert_tokens(
        self, x: Float[Tensor, "B c D"], t: Float[Tensor, " B"], state: Tensor | None
    ) -> tuple[Float[Tensor, "B m e"], Tensor, Float[Tensor, "B e"] | None]:
        raise NotImplementedError

    def velocity(
        self,
        prefix: PrefixRunner,
        x: Float[Tensor, "B c D"],
        t: Float[Tensor, " B"],
        state: Float[Tensor, "B D"] | None = None,
    ) -> Float[Tensor, "B c D"]:
        """The velocity ``[B, chunk, max_dim]`` (float32) at noisy actions ``x`` (padded)
        and time ``t``: the expert's suffix run against ``prefix``, its last ``chunk``
        hidden states through ``action_out_proj``."""
        embeds, roles, condition = self.expert_tokens(x, t, state)
        hidden = prefix.run_suffix(embeds, roles, decoder=self.expert, condition=condition)
        proj = self.action_out_proj
        return proj(hidden[:, -self.chunk_size:].to(proj.weight.dtype)).to(torch.float32)

    # -- the head contract ------------------------------------------------------------------

    def loss(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, ""]:
        """Flow-matching loss: ``x_t = t eps + (1 - t) a`` over the ``max_dim`` padded dims,
        the expert's velocity against ``eps - a``, squared error over the real action dims
        only, averaged over the real (not padded) chunk steps
        ([action_loss_mean][vlakit.heads.action_loss_mean]). The prefix is encoded with
        gradients (its cache keeps the graph), the expert runs against it: the same numbers
        as one joint pass."""
        name = type(self).__name__
        sampling.check_training(name)
        actions = runner.target_actions().to(torch.float32)  # [b, c, a], normalised
        b, device = actions.shape[0], actions.device
        padded = F.pad(actions, (0, self.max_dim - self.action_dim))  # [b, c, D]
        t = training_time(sampling, b, device)
        self._check_noise(sampling, tuple(padded.shape))
        noise = training_noise(padded, sampling)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * padded
        state = self._state(runner)
        velocity = self.velocity(runner.prefix(), x_t, t, state)
        errors = (velocity - (noise - padded))[..., : self.action_dim].square()
        return action_loss_mean(errors, runner.target_is_pad())

    def predict(
        self, runner: ModelRunner, sampling: Sampling
    ) -> Float[Tensor, "b c a"] | Float[Tensor, "b n c a"]:
        """``num_steps`` Euler steps ([euler][vlakit.heads.euler], ``t = 1`` noise,
        ``dt = -1 / num_steps``) of the expert against the prefix encoded once (with slots
        reserved for the suffix: no per-step copy of the prefix), over all ``max_dim``
        dims; the real ``action_dim`` are cut at the end. Normalised actions
        ``[b, chunk, a]``, or ``[b, n, chunk, a]`` with ``sampling.num_samples = n`` (one
        prefix shared by the samples)."""
        sampling.check_prediction(type(self).__name__)
        n = 1 if sampling.num_samples is None else sampling.num_samples
        b, c, d = runner.batch_size, self.chunk_size, self.max_dim
        shape = (b, c, d) if sampling.num_samples is None else (b, n, c, d)
        self._check_noise(sampling, shape)
        state = self._state(runner)
        if state is not None and n > 1:
            state = state.repeat_interleave(n, 0)
        prefix = runner.prefix(n, suffix_len=self.num_action_tokens)
        noise = draw_noise(shape, runner.device, sampling).reshape(b * n, c, d)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return self.velocity(prefix, x, t, state)

        x = euler(velocity, noise, self.num_steps, sampling.step_wrapper)[..., : self.action_dim]
        return x.reshape(shape[:-1] + (self.action_dim,))

    def _time(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """pi0's sin/cos time embedding ``[B, width]`` (float64, then float32), in ``dtype``."""
        return sincos_time_embedding(t, self.width, self.min_period, self.max_period).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, action_dim={self.action_dim}, "
            f"max_dim={self.max_dim}, num_steps={self.num_steps}"
        )


@recorded
class Pi0Head(_ExpertFlowHead):
    """pi0's action expert and flow-matching head (openpi, LeRobot ``PI0Policy``).

    - suffix: one state token ``state_proj(state)`` (the normalised ``inputs.proprio``,
      zero-padded to ``max_dim``; role ``PROPRIO``), then ``chunk`` action tokens
      ``action_time_mlp_out(swish(action_time_mlp_in([action_in_proj(x_t), time])))`` with
      the sin/cos time embedding (the expert's width, periods ``min_period`` to
      ``max_period``; role ``ACTION``). A [`RoleBlockMask`][vlakit.core.RoleBlockMask]
      ``[{BOS, IMAGE, TEXT, EOS}, {PROPRIO}, {ACTION}]`` gives pi0's pattern: the prefix
      both ways and blind to the suffix, the state token the prefix and itself, the action
      tokens everything.
    - expert: the suffix through ``expert`` against the prefix cache; the last ``chunk``
      hidden states through ``action_out_proj`` give the velocity ``[b, chunk, max_dim]``.
    - loss: ``t ~ 0.999 Beta(1.5, 1) + 0.001``, ``eps ~ N(0, 1)`` over all ``max_dim`` dims,
      ``x_t = t eps + (1 - t) a`` with ``a`` zero-padded, squared error against ``eps - a``
      on the real ``action_dim`` dims (LeRobot's cut; ``action_out_proj``'s rows past them
      get no gradient), the mean over real chunk steps (``action_is_pad`` steps left out;
      LeRobot 0.6.1 ignores ``action_is_pad`` and averages every step).
    - predict: ``num_steps`` Euler steps from noise at ``t = 1`` over all ``max_dim`` dims
      (the padded dims' velocities are untrained, yet feed ``action_in_proj`` at the next
      step, as in the references), cut to ``action_dim`` at the end.

    Build the model with [pi0][vlakit.models.pi0.pi0] (or ``pi0_3b``); the head reads the
    robot state itself (it is a [ProprioHead][vlakit.heads.ProprioHead]), so the model has no
    proprio projector.

    Args:
        expert: the action expert, a layer stack without conditioned norms
            ([`gemma_300m_stack`][vlakit.decoders.gemma_300m_stack] for pi0) whose attention
            geometry matches the main decoder's ([check_expert][vlakit.decoders.check_expert]).
        action_dim: the robot's action dims (the real ones, ``<= max_dim``).
        chunk_size: actions per prediction (pi0: 50).
        num_steps: Euler steps at prediction (pi0: 10).
        max_dim: the width actions and state are zero-padded to (pi0: 32).
        prompt_length: the tokenised prompt length processors pad to (LeRobot's
            ``tokenizer_max_length``, pi0: 48); the model itself reads any length.
        min_period: the time embedding's shortest period.
        max_period: its longest period.
    """

    def __init__(
        self,
        expert: nn.Module,
        action_dim: int,
        chunk_size: int = 50,
        num_steps: int = 10,
        max_dim: int = 32,
        prompt_length: int = 48,
        min_period: float = 4e-3,
        max_period: float = 4.0,
    ) -> None:
        super().__init__()
        width = self._setup(expert, action_dim, chunk_size, num_steps, max_dim, prompt_length,
                            min_period, max_period)
        cond = getattr(expert, "condition_dim", None)
        if cond is not None:
            raise ValueError(
                f"Pi0Head conditions the expert on nothing, but its norms read a condition of "
                f"width {cond} (adaptive norms, pi0.5's): use Pi05Head, or an expert with plain "
                f"norms (gemma_300m_stack())"
            )
        self.action_in_proj = nn.Linear(max_dim, width)
        self.action_out_proj = nn.Linear(width, max_dim)
        self.state_proj = nn.Linear(max_dim, width)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

    def proprio_width(self) -> int:
        """The widest state the head takes (``max_dim``: shorter states are zero-padded)."""
        return self.max_dim

    @property
    def num_action_tokens(self) -> int:
        """Suffix tokens the expert runs after the prefix: the state token and ``chunk``."""
        return 1 + self.chunk_size

    def _state(self, runner: ModelRunner) -> Float[Tensor, "b D"]:
        proprio = runner.proprio()
        if proprio is None:
            raise ValueError(
                f"Pi0Head feeds the robot state to its action expert (one state token), but "
                f"inputs.proprio is None: pass the state [batch, p] with p <= max_dim="
                f"{self.max_dim} (the processor's proprio=)"
            )
        if proprio.dim() != 2 or proprio.shape[-1] > self.max_dim:
            raise ValueError(
                f"inputs.proprio has shape {tuple(proprio.shape)}, but Pi0Head zero-pads the "
                f"state [batch, p] to max_dim={self.max_dim}: pass at most {self.max_dim} state "
                f"dims, or build the head with max_dim >= {proprio.shape[-1]}"
            )
        return F.pad(proprio.to(torch.float32), (0, self.max_dim - proprio.shape[-1]))

    def expert_tokens(
        self, x: Float[Tensor, "B c D"], t: Float[Tensor, " B"], state: Tensor | None
    ) -> tuple[Float[Tensor, "B m e"], Tensor, None]:
        """The expert's suffix ``[state token, chunk action tokens]`` ``[B, 1 + chunk, e]``,
        its roles (``PROPRIO``, then ``ACTION``) and no condition."""
        if state is None:
            raise ValueError("Pi0Head.expert_tokens needs the padded state [B, max_dim]")
        dtype = self.action_in_proj.weight.dtype
        actions = self.action_in_proj(x.to(dtype))  # [B, c, e]
        time = self._time(t, dtype)[:, None].expand_as(actions)
        mixed = self.action_time_mlp_in(torch.cat((actions, time), dim=-1))
        tokens = self.action_time_mlp_out(F.silu(mixed))
        state_token = self.state_proj(state.to(dtype))[:, None]  # [B, 1, e]
        b, device = x.shape[0], x.device
        roles = torch.cat((
            torch.full((b, 1), int(TokenRole.PROPRIO), dtype=torch.long, device=device),
            torch.full((b, self.chunk_size), int(TokenRole.ACTION), dtype=torch.long,
                       device=device),
        ), dim=1)
        return torch.cat((state_token, tokens), dim=1), roles, None


@recorded
class Pi05Head(_ExpertFlowHead):
    """pi0.5's action expert and flow-matching head (openpi ``pi05``, LeRobot ``PI05Policy``).

    As [Pi0Head][vlakit.heads.Pi0Head] but: no state token (pi0.5 writes the state into the
    prompt as 256 bins: [pi05_prompt][vlakit.processors.pi05_prompt]); the action tokens are
    ``action_in_proj(x_t)`` alone; the time embedding goes through
    ``swish(time_mlp_out(swish(time_mlp_in(time))))`` and that ``[b, width]`` is the
    condition of the expert's adaptive RMSNorms (scale, shift and the gate of each gated
    residual; [AdaptiveRMSNorm][vlakit.decoders.AdaptiveRMSNorm]), passed as
    ``run_suffix(..., condition=)``. The main decoder reads no condition.

    Args:
        expert: the action expert with adaptive norms reading a condition of its own width
            ([pi0_expert][vlakit.models.pi0_expert] with ``cond_dim=1024``), attention
            geometry matching the main decoder's.
        action_dim: the robot's action dims (``<= max_dim``).
        chunk_size: actions per prediction (pi0.5: 50).
        num_steps: Euler steps at prediction (10).
        max_dim: the width actions are zero-padded to (32).
        prompt_length: the tokenised prompt length processors pad to (pi0.5: 200).
        min_period: the time embedding's shortest period.
        max_period: its longest period.
    """

    def __init__(
        self,
        expert: nn.Module,
        action_dim: int,
        chunk_size: int = 50,
        num_steps: int = 10,
        max_dim: int = 32,
        prompt_length: int = 200,
        min_period: float = 4e-3,
        max_period: float = 4.0,
    ) -> None:
        super().__init__()
        width = self._setup(expert, action_dim, chunk_size, num_steps, max_dim, prompt_length,
                            min_period, max_period)
        cond = getattr(expert, "condition_dim", None)
        if cond != width:
            raise ValueError(
                "Pi05Head feeds the time MLP's output [batch, "
                f"{width}] (the expert's width) to the expert's adaptive norms, but "
                + ("the expert's norms read no condition: build it with adaptive norms, "
                   f"e.g. pi0_expert(cond_dim={width})" if cond is None else
                   f"they read a condition of width {cond}: build them with cond_dim={width}")
            )
        self.action_in_proj = nn.Linear(max_dim, width)
        self.action_out_proj = nn.Linear(width, max_dim)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)

    def condition(self, t: Float[Tensor, " B"]) -> Float[Tensor, "B e"]:
        """The adaptive norms' condition: ``swish(time_mlp_out(swish(time_mlp_in(
        time_embedding(t)))))``."""
        hidden = self.time_mlp_in(self._time(t, self.time_mlp_in.weight.dtype))
        return F.silu(self.time_mlp_out(F.silu(hidden)))

    def expert_tokens(
        self, x: Float[Tensor, "B c D"], t: Float[Tensor, " B"], state: Tensor | None = None
    ) -> tuple[Float[Tensor, "B c e"], Tensor, Float[Tensor, "B e"]]:
        """The expert's suffix ``[B, chunk, e]`` (``action_in_proj(x)``), its roles
        (``ACTION``) and the condition of its adaptive norms."""
        tokens = self.action_in_proj(x.to(self.action_in_proj.weight.dtype))
        roles = torch.full(tokens.shape[:2], int(TokenRole.ACTION), dtype=torch.long,
                           device=x.device)
        return tokens, roles, self.condition(t)
