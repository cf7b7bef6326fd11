"""Core: token roles and attention-mask policies. Imports nothing else of vlakit."""

from vlakit.core.masks import (
    bidirectional_mask,
    causal_mask,
    check_mask_shape,
    positions_from_valid,
    prefix_lm_mask,
    segment_mask,
)
from vlakit.core.roles import TokenRole

__all__ = [
    "TokenRole",
    "segment_mask",
    "causal_mask",
    "bidirectional_mask",
    "prefix_lm_mask",
    "positions_from_valid",
    "check_mask_shape",
]
