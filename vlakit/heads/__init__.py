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
from vlakit.heads.diffusion import DiffusionActionHead, NoisyActionProjector
from vlakit.heads.discrete import ActionCodec, DiscreteActionHead
from vlakit.heads.flow import FlowMatchingHead
from vlakit.heads.l1 import L1RegressionHead
from vlakit.heads.lm_loss import next_token_loss
from vlakit.heads.mlp_resnet import MLPResNet, MLPResNetBlock
from vlakit.heads.next_token import NextTokenHead
from vlakit.heads.slots import SLOT_READS, read_slots
from vlakit.heads.time_embedding import sincos_time_embedding, sinusoidal_embedding

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
    "L1RegressionHead",
    "DiffusionActionHead",
    "FlowMatchingHead",
    "MLPResNet",
    "MLPResNetBlock",
    "NoisyActionProjector",
    "read_slots",
    "SLOT_READS",
    "sinusoidal_embedding",
    "sincos_time_embedding",
]
