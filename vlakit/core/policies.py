"""Mask policies: functions of a :class:`TokenSequence` that return its attention mask.

A VLA model holds one policy; the decoder receives the mask it returns. All are built on
:func:`vlakit.core.masks.segment_mask`.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from vlakit.core.masks import bidirectional_mask, causal_mask, prefix_lm_mask, segment_mask
from vlakit.core.roles import TokenRole
from vlakit.core.sequence import TokenSequence

__all__ = ["MaskPolicy", "CausalMask", "BidirectionalMask", "PrefixLMMask", "RoleBlockMask"]


class MaskPolicy:
    """Base class: ``policy(seq) -> [b, n, n]`` boolean mask (``True`` = may attend)."""

    def __call__(self, seq: TokenSequence) -> Bool[Tensor, "b n n"]:
        raise TypeError(f"{type(self).__name__} does not define a mask")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CausalMask(MaskPolicy):
    """Every token sees itself and the real tokens before it (OpenVLA, Llama)."""

    def __call__(self, seq: TokenSequence) -> Bool[Tensor, "b n n"]:
        return causal_mask(seq.valid)


class BidirectionalMask(MaskPolicy):
    """Every real token sees every real token (OpenVLA-OFT's parallel decoding)."""

    def __call__(self, seq: TokenSequence) -> Bool[Tensor, "b n n"]:
        return bidirectional_mask(seq.valid)


class PrefixLMMask(MaskPolicy):
    """Prefix both ways, suffix (``seq.is_suffix``) causally (PaliGemma)."""

    def __call__(self, seq: TokenSequence) -> Bool[Tensor, "b n n"]:
        return prefix_lm_mask(seq.is_suffix, seq.valid)


class RoleBlockMask(MaskPolicy):
    """Blocks of roles, each seeing itself and the blocks listed before it (pi0).

    ``RoleBlockMask([{IMAGE, TEXT, BOS}, {PROPRIO}, {TIMESTEP, ACTION}])`` lets the prefix
    attend only to itself, the state token to the prefix and itself, and the action tokens
    to everything. Roles not listed (e.g. ``PAD``) fall in block 0 and are masked as padding
    anyway; a role listed twice raises.

    Args:
        blocks: role groups in attention order.
    """

    def __init__(self, blocks: Sequence[set[TokenRole] | Sequence[TokenRole]]) -> None:
        seen: set[TokenRole] = set()
        self.block_of: dict[int, int] = {}
        for index, block in enumerate(blocks):
            for role in block:
                if role in seen:
                    raise ValueError(f"role {TokenRole(role).name} is listed in two blocks")
                seen.add(role)
                self.block_of[int(role)] = index
        self.blocks = [sorted(TokenRole(r) for r in block) for block in blocks]

    def __call__(self, seq: TokenSequence) -> Bool[Tensor, "b n n"]:
        table = torch.zeros(len(TokenRole), dtype=torch.long, device=seq.roles.device)
        for role, block in self.block_of.items():
            table[role] = block
        return segment_mask(table[seq.roles], seq.valid)

    def __repr__(self) -> str:
        names = [[r.name for r in block] for block in self.blocks]
        return f"RoleBlockMask({names})"
