"""OpenVLA-OFT's diffusion head: noise prediction over the action slots, any diffusers
scheduler, two layouts (OFT's full re-run, or a cached prefix)."""

import copy
import dataclasses
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core import TokenRole, TokenSequence
from vlakit.core.recording import recorded
from vlakit.heads._steps import StepRunner
from vlakit.heads.base import HeadTokens, ModelRunner, action_loss_mean, has_action_targets
from vlakit.heads.mlp_resnet import MLPResNet
from vlakit.heads.sampling import (
    Sampling,
    draw_noise,
    prediction_generator,
    rowwise,
    scheduler_denoise,
    training_noise,
)
from vlakit.heads.slots import check_reads, read_slots
from vlakit.heads.time_embedding import sinusoidal_embedding

__all__ = ["DiffusionActionHead", "NoisyActionProjector"]

DIFFUSION_LAYOUTS = ("oft", "cached")


@recorded
class NoisyActionProjector(nn.Module):
    """One token per action scalar: ``fc2(gelu(fc1(x)))``, ``[b, m, 1] -> [b, m, d]``
    (OpenVLA-OFT; 16,789,504 parameters at ``d = 4096``).

    Args:
        dim: the decoder's width ``d``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(1, dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Float[Tensor, "*batch 1"]) -> Float[Tensor, "*batch d"]:
        if x.shape[-1] != 1:
            raise ValueError(
                f"NoisyActionProjector takes one scalar per token ([..., 1]), got shape "
                f"{tuple(x.shape)}"
            )
        return self.fc2(self.act_fn1(self.fc1(x)))


def ddim_scheduler(num_train_timesteps: int = 50):
    """OFT's scheduler: ``diffusers.DDIMScheduler(num_train_timesteps=50,
    beta_schedule="squaredcos_cap_v2")`` (diffusers' defaults otherwise)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2"
    )


@recorded
class DiffusionActionHead(nn.Module):
    """Denoising diffusion over an action chunk (OpenVLA-OFT's DDIM head by default).

    - place: the noisy actions ``x_k`` projected one token per scalar into the
      ``chunk * a`` slots ([NoisyActionProjector][vlakit.heads.NoisyActionProjector]), and
      the timestep ``k`` as one ``TIMESTEP`` token (its sinusoidal embedding of width ``d``).
      Training samples ``k ~ U{0..T-1}`` and ``eps ~ N(0, 1)`` per example and noises the
      target with the scheduler's own ``add_noise``.
    - reads: the hidden states feeding the slots (``read="previous"``, OFT), grouped per
      chunk step to ``[b, chunk, a * d]``, through a noise-prediction
      [MLPResNet][vlakit.heads.MLPResNet] to ``[b, chunk, a]``.
    - loss: mean squared error against ``eps`` (float32).
    - predict: ``x`` from ``N(0, 1)`` (or the given noise), then
      [scheduler_denoise][vlakit.heads.scheduler_denoise]: for each of the scheduler's
      ``num_inference_steps`` timesteps ``x = scheduler.step(eps_hat, k, x).prev_sample``,
      the passed scheduler's own arithmetic. Randomness comes from
      [Sampling][vlakit.heads.Sampling] (generator or given noise; never the global state).

    Layouts (the sequence is ``<s>, images, [proprio], ..., prompt, slots, </s>``):

    - ``"oft"`` (default): the timestep token sits before the prompt, after proprio, as in
      OpenVLA-OFT; since it changes every step, every step re-runs the whole sequence.
      Needed for OFT checkpoints, works under any mask.
    - ``"cached"``: the timestep token leads the slots in the suffix; the prefix (images,
      proprio, prompt) is encoded once into a read-only KV cache and each step runs only
      ``1 + chunk * a + 1`` tokens. Needs a mask policy that keeps the prefix blind to the
      suffix ([ParallelDecodingMask][vlakit.core.ParallelDecodingMask],
      [CausalMask][vlakit.core.CausalMask]); with ``HFDecoder`` it falls back to full
      re-runs (same numbers) and warns once.

    Args:
        hidden_size: the decoder's width ``d``.
        action_dim: action dimensions ``a``.
        chunk_size: actions per prediction.
        scheduler: a diffusers scheduler (default: OFT's DDIM, 50 training steps,
            ``squaredcos_cap_v2``). The head keeps its own copy.
        num_inference_steps: denoising steps at prediction (at most the scheduler's
            ``num_train_timesteps``).
        mlp_dim: width of the noise predictor (default ``hidden_size``).
        num_blocks: its residual blocks.
        layout: ``"oft"`` or ``"cached"``.
        read: ``"previous"`` (OFT), ``"slot"`` or ``"next"`` (see
            [SLOT_READS][vlakit.heads.SLOT_READS]).
        predict_read: the read at prediction, if it differs from training's
            (LightVLA's release: ``"next"``); default ``read``.
    """

    def __init__(
        self,
        hidden_size: int,
        action_dim: int,
        chunk_size: int,
        scheduler: Any = None,
        num_inference_steps: int = 50,
        mlp_dim: int | None = None,
        num_blocks: int = 2,
        layout: str = "oft",
        read: str = "previous",
        predict_read: str | None = None,
    ) -> None:
        super().__init__()
        if layout not in DIFFUSION_LAYOUTS:
            raise ValueError(f"layout must be one of {DIFFUSION_LAYOUTS}, got {layout!r}")
        read, predict_read = check_reads(read, predict_read)
        with torch.device("cpu"):  # its tables live on the host, also when built on meta
            if scheduler is None:
                scheduler = ddim_scheduler()
            else:  # a fresh copy from its config: the passed one may hold meta tensors
                scheduler = type(scheduler).from_config(copy.deepcopy(scheduler.config))
        train_steps = scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= train_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must be between 1 and the "
                f"scheduler's num_train_timesteps={train_steps}"
            )
        self.hidden_size, self.action_dim, self.chunk_size = hidden_size, action_dim, chunk_size
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.layout, self.read, self.predict_read = layout, read, predict_read
        self.noisy_action_projector = NoisyActionProjector(hidden_size)
        self.noise_predictor = nn.ModuleDict(
            {"mlp_resnet": MLPResNet(action_dim * hidden_size, mlp_dim or hidden_size,
                                     action_dim, num_blocks)}
        )

    @property
    def num_action_tokens(self) -> int:
        """Slots per example: ``chunk_size * action_dim`` (plus one timestep token)."""
        return self.chunk_size * self.action_dim

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def has_targets(self, inputs: Any) -> bool:
        return has_action_targets(inputs)

    def tokens(
        self, noisy: Float[Tensor, "b c a"], timesteps: Tensor, dtype: torch.dtype
    ) -> HeadTokens:
        """The head's tokens for noisy actions at ``timesteps [b]``, in this layout."""
        proj_dtype = self.noisy_action_projector.fc1.weight.dtype
        flat = rearrange(noisy, "b c a -> b (c a) 1").to(proj_dtype)
        slots = self.noisy_action_projector(flat).to(dtype)  # [b, m, d]
        time = sinusoidal_embedding(timesteps, self.hidden_size).to(dtype)[:, None]  # [b, 1, d]
        if self.layout == "oft":
            return HeadTokens(extras=[(time, TokenRole.TIMESTEP)], action_embeds=slots)
        b, m = slots.shape[:2]
        roles = torch.full((b, 1 + m), int(TokenRole.ACTION), device=slots.device)
        roles[:, 0] = int(TokenRole.TIMESTEP)
        return HeadTokens(action_embeds=torch.cat((time, slots), 1), action_roles=roles)

    def predict_noise(
        self, hidden: Float[Tensor, "b n d"], seq: TokenSequence, read: str | None = None
    ) -> Float[Tensor, "b c a"]:
        """Predicted noise ``[b, chunk, a]`` (float32) from the final hidden states
        (``read``: default the training read)."""
        read = self.read if read is None else read
        slots = read_slots(hidden, seq, self.num_action_tokens, read, type(self).__name__)
        grouped = rearrange(slots, "b (c a) d -> b c (a d)", c=self.chunk_size)
        mlp = self.noise_predictor["mlp_resnet"]
        return mlp(grouped.to(mlp.fc1.weight.dtype)).to(torch.float32)

    def training_tokens(
        self, actions: Float[Tensor, "b c a"], sampling: Sampling, dtype: torch.dtype
    ) -> tuple[HeadTokens, Float[Tensor, "b c a"]]:
        """Tokens of the targets noised by the scheduler's ``add_noise`` at timesteps ``k``,
        and the noise; ``k ~ U{0..T-1}`` and ``eps`` from ``sampling`` (given, or drawn:
        its generator, else torch's)."""
        sampling.check_training(type(self).__name__)
        actions = actions.to(torch.float32)
        b, device = actions.shape[0], actions.device
        generator = sampling.generator
        noise = training_noise(actions, sampling)
        timesteps = sampling.time
        if timesteps is None:
            timesteps = rowwise(
                lambda s, g: torch.randint(0, self.num_train_timesteps, s, device=device,
                                           generator=g), (b,), generator)
        elif tuple(timesteps.shape) != (b,) or timesteps.is_floating_point():
            raise ValueError(
                f"Sampling.time must be [batch={b}] integer diffusion timesteps in "
                f"0..{self.num_train_timesteps - 1}, got {timesteps.dtype} of shape "
                f"{tuple(timesteps.shape)}"
            )
        elif not torch.compiler.is_compiling() and bool(
            ((timesteps < 0) | (timesteps >= self.num_train_timesteps)).any()
        ):
            raise ValueError(
                f"Sampling.time holds diffusion timesteps {timesteps.tolist()}, outside "
                f"0..{self.num_train_timesteps - 1} (the scheduler's num_train_timesteps)"
            )
        timesteps = timesteps.to(device)
        noisy = self.scheduler.add_noise(actions, noise, timesteps)
        return self.tokens(noisy, timesteps, dtype), noise

    def loss(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, ""]:
        """Mean squared error between predicted and sampled noise (one pass over the whole
        sequence with the noised action slots)."""
        tokens, noise = self.training_tokens(runner.target_actions(), sampling, runner.dtype)
        hidden, seq = runner.run(tokens)
        errors = (self.predict_noise(hidden, seq) - noise).square()  # [b, c, a]
        return action_loss_mean(errors, runner.target_is_pad())

    def noise_at(self, steps: StepRunner):
        """The noise-prediction closure ``(x [B, c, a], timesteps [B]) -> eps_hat`` over one
        step's pass of ``steps`` (the prediction read)."""

        def noise_prediction(x: Tensor, timesteps: Tensor) -> Tensor:
            hidden, seq = steps(self.tokens(x, timesteps, steps.dtype))
            return self.predict_noise(hidden, seq, self.predict_read)

        return noise_prediction

    def predict(
        self, runner: ModelRunner, sampling: Sampling
    ) -> Float[Tensor, "b c a"] | Float[Tensor, "b n c a"]:
        """Denoise from ``N(0, 1)`` with [scheduler_denoise][vlakit.heads.scheduler_denoise]:
        normalised actions ``[b, chunk, a]``, or ``[b, num_samples, chunk, a]`` with
        ``sampling.num_samples``."""
        sampling.check_prediction(type(self).__name__)
        n = 1 if sampling.num_samples is None else sampling.num_samples
        # the cached layout's suffix: the timestep token, then the slots
        steps = StepRunner(self, runner, n, self.layout == "cached", 1 + self.num_action_tokens)
        b, c, a = runner.batch_size, self.chunk_size, self.action_dim
        shape = (b, c, a) if sampling.num_samples is None else (b, n, c, a)
        generator = prediction_generator(sampling, steps.device)
        noise = draw_noise(shape, steps.device, dataclasses.replace(sampling, generator=generator))
        if isinstance(generator, tuple):  # one per example: each of its n samples draws from it
            generator = [g for g in generator for _ in range(n)]
        x = scheduler_denoise(self.noise_at(steps), noise.reshape(b * n, c, a), self.scheduler,
                              self.num_inference_steps, sampling.step_wrapper, generator)
        return x.view(shape)

    def extra_repr(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, action_dim={self.action_dim}, "
            f"scheduler={type(self.scheduler).__name__}, "
            f"num_inference_steps={self.num_inference_steps}, layout={self.layout!r}, "
            f"read={self.read!r}"
            + (f", predict_read={self.predict_read!r}" if self.predict_read != self.read else "")
        )
