"""Heads: place their tokens, read hidden states by role, own their loss and prediction.

The contract ([Head][vlakit.heads.Head], [ActionHead][vlakit.heads.ActionHead],
[ModelRunner][vlakit.heads.ModelRunner]) is in ``vlakit.heads.base``; the samplers
([euler][vlakit.heads.euler], [scheduler_denoise][vlakit.heads.scheduler_denoise]) and the
sampling argument ([Sampling][vlakit.heads.Sampling]) in ``vlakit.heads.sampling``; see the
heads page of the documentation for a diagram.
"""

from vlakit.heads.base import (
    ActionHead,
    Head,
    HeadTokens,
    ModelRunner,
    PrefixRunner,
    ProprioHead,
    action_loss_mean,
    has_action_targets,
)
from vlakit.heads.diffusion import DiffusionActionHead, NoisyActionProjector
from vlakit.heads.discrete import ActionCodec, DiscreteActionHead
from vlakit.heads.flow import FlowMatchingHead
from vlakit.heads.l1 import L1RegressionHead
from vlakit.heads.lm_loss import next_token_loss
from vlakit.heads.mlp_resnet import MLPResNet, MLPResNetBlock
from vlakit.heads.next_token import NextTokenHead
from vlakit.heads.pi0 import Pi0Head, Pi05Head
from vlakit.heads.rtc import (
    PREFIX_SCHEDULES,
    GuidedRTC,
    InpaintRTC,
    guidance_weight,
    inpaint_weights,
    prefix_weights,
)
from vlakit.heads.sampling import (
    DenoiseStep,
    Sampling,
    StepWrapper,
    draw_noise,
    euler,
    flow_training_time,
    prediction_generator,
    rowwise,
    scheduler_denoise,
    training_noise,
    training_time,
)
from vlakit.heads.slots import SLOT_READS, read_slots
from vlakit.heads.time_embedding import sincos_time_embedding, sinusoidal_embedding

__all__ = [
    "Head",
    "ActionHead",
    "ProprioHead",
    "HeadTokens",
    "ModelRunner",
    "PrefixRunner",
    "has_action_targets",
    "action_loss_mean",
    "Sampling",
    "DenoiseStep",
    "StepWrapper",
    "euler",
    "scheduler_denoise",
    "draw_noise",
    "training_noise",
    "flow_training_time",
    "training_time",
    "rowwise",
    "prediction_generator",
    "GuidedRTC",
    "InpaintRTC",
    "prefix_weights",
    "inpaint_weights",
    "guidance_weight",
    "PREFIX_SCHEDULES",
    "DiscreteActionHead",
    "ActionCodec",
    "NextTokenHead",
    "next_token_loss",
    "L1RegressionHead",
    "DiffusionActionHead",
    "FlowMatchingHead",
    "Pi0Head",
    "Pi05Head",
    "MLPResNet",
    "MLPResNetBlock",
    "NoisyActionProjector",
    "read_slots",
    "SLOT_READS",
    "sinusoidal_embedding",
    "sincos_time_embedding",
]
