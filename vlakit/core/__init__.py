"""Core: token roles, the token sequence, mask builders and mask policies.

Imports nothing else of vlakit.
"""

from vlakit.core.checkpoint import (
    CheckpointError,
    CheckpointFiles,
    CheckpointView,
    LoadReport,
    guard_meta_loading,
    load_checked,
    load_into,
    read_torch_weights,
    strip_prefix,
)
from vlakit.core.checks import set_validation, validation, validation_enabled
from vlakit.core.init import building, init_parameters
from vlakit.core.linear import LinearFactory
from vlakit.core.low_rank import LoRALinear, apply_lora, lora, merge_lora, replace_linears
from vlakit.core.masks import (
    MaskSpec,
    bidirectional_mask,
    causal_mask,
    check_mask_shape,
    positions_from_valid,
    prefix_lm_mask,
    segment_mask,
)
from vlakit.core.policies import (
    BidirectionalMask,
    CausalMask,
    MaskPolicy,
    ParallelDecodingMask,
    PrefixLMMask,
    RoleBlockMask,
)
from vlakit.core.recording import (
    DescriptionError,
    describe,
    rebuild,
    record_call,
    recorded,
    replace_module,
)
from vlakit.core.roles import TokenRole
from vlakit.core.sequence import IGNORE_ID, TokenSequence
from vlakit.core.sharding import check_gathered
from vlakit.core.tap import AttentionTap

__all__ = [
    "check_gathered",
    "LinearFactory",
    "LoRALinear",
    "lora",
    "apply_lora",
    "replace_linears",
    "merge_lora",
    "init_parameters",
    "building",
    "CheckpointError",
    "load_checked",
    "guard_meta_loading",
    "CheckpointFiles",
    "CheckpointView",
    "LoadReport",
    "load_into",
    "read_torch_weights",
    "strip_prefix",
    "recorded",
    "record_call",
    "replace_module",
    "describe",
    "rebuild",
    "DescriptionError",
    "TokenRole",
    "TokenSequence",
    "AttentionTap",
    "IGNORE_ID",
    "segment_mask",
    "causal_mask",
    "bidirectional_mask",
    "prefix_lm_mask",
    "positions_from_valid",
    "check_mask_shape",
    "MaskSpec",
    "MaskPolicy",
    "CausalMask",
    "BidirectionalMask",
    "PrefixLMMask",
    "ParallelDecodingMask",
    "RoleBlockMask",
    "set_validation",
    "validation",
    "validation_enabled",
]
