"""Heads: place their tokens, read hidden states by role, own their loss and prediction.

The contract ([Head][vlakit.heads.Head], [ActionHead][vlakit.heads.ActionHead],
[PredictionRunner][vlakit.heads.PredictionRunner]) is in ``vlakit.heads.base``; see the
heads page of the documentation for a diagram.
"""

from vlakit.heads.base import (
    ActionHead,
    Head,
    HeadTokens,
    PredictionRunner,
    PrefixRunner,
    PrefixTrainedHead,
)
from vlakit.heads.discrete import ActionCodec, DiscreteActionHead
from vlakit.heads.lm_loss import next_token_loss
from vlakit.heads.next_token import NextTokenHead

__all__ = [
    "Head",
    "ActionHead",
    "HeadTokens",
    "PredictionRunner",
    "PrefixRunner",
    "PrefixTrainedHead",
    "DiscreteActionHead",
    "ActionCodec",
    "NextTokenHead",
    "next_token_loss",
]
