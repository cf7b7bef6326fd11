"""OpenVLA-OFT's L1 regression head: a whole action chunk from one parallel pass."""

from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core import TokenSequence
from vlakit.core.recording import recorded
from vlakit.heads.base import HeadTokens, ModelRunner, action_loss_mean, has_action_targets
from vlakit.heads.mlp_resnet import MLPResNet
from vlakit.heads.sampling import Sampling
from vlakit.heads.slots import check_reads, read_slots

__all__ = ["L1RegressionHead"]


@recorded
class L1RegressionHead(nn.Module):
    """Continuous actions regressed from the hidden states of ``chunk * a`` action slots.

    - place: ``chunk_size * action_dim`` slots whose input embeddings are exact zeros (for
      training and prediction alike).
    - reads: the final hidden state feeding each slot (``read="previous"``: the one before
      it, as OFT trains; ``"slot"``: its own), grouped per chunk step to
      ``[b, chunk, action_dim * d]``, through an [MLPResNet][vlakit.heads.MLPResNet] to
      ``[b, chunk, action_dim]``.
    - loss: mean absolute error against the normalised target actions (float32).
    - predict: one pass over the sequence with the zero slots; no loop, no cache.

    OFT LIBERO: ``L1RegressionHead(4096, action_dim=7, chunk_size=8)``: 151,117,831
    parameters. Works on any decoder (own or ``HFDecoder``) and any mask policy; OFT
    decodes under [BidirectionalMask][vlakit.core.BidirectionalMask].

    Args:
        hidden_size: the decoder's width ``d``.
        action_dim: action dimensions ``a``.
        chunk_size: actions per prediction.
        mlp_dim: width of the MLPResNet (default ``hidden_size``).
        num_blocks: residual blocks of the MLPResNet.
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
        mlp_dim: int | None = None,
        num_blocks: int = 2,
        read: str = "previous",
        predict_read: str | None = None,
    ) -> None:
        super().__init__()
        self.read, self.predict_read = check_reads(read, predict_read)
        self.hidden_size, self.action_dim, self.chunk_size = hidden_size, action_dim, chunk_size
        self.model = MLPResNet(
            action_dim * hidden_size, mlp_dim or hidden_size, action_dim, num_blocks
        )

    @property
    def num_action_tokens(self) -> int:
        """Slots per example: ``chunk_size * action_dim``."""
        return self.chunk_size * self.action_dim

    def has_targets(self, inputs: Any) -> bool:
        return has_action_targets(inputs)

    def slot_embeds(
        self, batch: int, device: torch.device, dtype: torch.dtype
    ) -> Float[Tensor, "b m d"]:
        """Zero slot embeddings ``[b, chunk * a, d]``."""
        shape = (batch, self.num_action_tokens, self.hidden_size)
        return torch.zeros(shape, device=device, dtype=dtype)

    def actions_from(
        self, hidden: Float[Tensor, "b n d"], seq: TokenSequence, read: str | None = None
    ) -> Float[Tensor, "b c a"]:
        """Normalised actions ``[b, chunk, a]`` (float32) from the final hidden states
        (``read``: default the training read)."""
        read = self.read if read is None else read
        slots = read_slots(hidden, seq, self.num_action_tokens, read, type(self).__name__)
        grouped = rearrange(slots, "b (c a) d -> b c (a d)", c=self.chunk_size)
        return self.model(grouped.to(self.model.fc1.weight.dtype)).to(torch.float32)

    def loss(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, ""]:
        """Mean absolute error between predicted and target normalised actions (one pass
        with zero slots)."""
        sampling.check_deterministic(type(self).__name__)
        target = runner.target_actions().to(torch.float32)
        slots = self.slot_embeds(runner.batch_size, runner.device, runner.dtype)
        hidden, seq = runner.run(HeadTokens(action_embeds=slots))
        errors = (self.actions_from(hidden, seq) - target).abs()  # [b, c, a]
        return action_loss_mean(errors, runner.target_is_pad())

    def predict(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, "b c a"]:
        """One pass with zero slots; normalised actions ``[b, chunk, a]`` (float32)."""
        sampling.check_deterministic(type(self).__name__)
        slots = self.slot_embeds(runner.batch_size, runner.device, runner.dtype)
        hidden, seq = runner.run(HeadTokens(action_embeds=slots))
        return self.actions_from(hidden, seq, self.predict_read)

    def extra_repr(self) -> str:
        reads = f"read={self.read!r}"
        if self.predict_read != self.read:
            reads += f", predict_read={self.predict_read!r}"
        return f"chunk_size={self.chunk_size}, action_dim={self.action_dim}, {reads}"

