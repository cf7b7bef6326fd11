"""Action heads: read hidden states at the action slots, give a loss or actions."""

from vlakit.heads.discrete import DiscreteActionHead
from vlakit.heads.lm_loss import next_token_loss

__all__ = ["DiscreteActionHead", "next_token_loss"]
