"""Mask policies: functions of a [`TokenSequence`][vlakit.core.TokenSequence] that return its
attention mask.

A VLA model holds one policy; the decoder receives the mask it returns. All are built on
[`vlakit.core.masks.segment_mask`][vlakit.core.segment_mask].
"""

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from vlakit.core.masks import MaskSpec
from vlakit.core.recording import recorded
from vlakit.core.roles import TokenRole
from vlakit.core.sequence import TokenSequence

__all__ = [
    "MaskPolicy",
    "CausalMask",
    "BidirectionalMask",
    "PrefixLMMask",
    "ParallelDecodingMask",
    "RoleBlockMask",
]


class MaskPolicy:
    """Base class: ``policy.spec(seq)`` says what the policy knows (a
    [MaskSpec][vlakit.core.MaskSpec]: segment ids, validity, whether it is plainly causal);
    ``policy(seq)`` is the dense ``[b, n, n]`` boolean mask (``True`` = may attend).

    A subclass defines [`segment_ids`][vlakit.core.MaskPolicy.segment_ids] (and
    [`is_causal`][vlakit.core.MaskPolicy.is_causal] if it can be).
    """

    def segment_ids(self, seq: TokenSequence) -> Int[Tensor, "b n"]:
        """``[b, n]`` segment per token (see [segment_mask][vlakit.core.segment_mask])."""
        raise TypeError(
            f"{type(self).__name__} does not define a mask: a MaskPolicy subclass must "
            f"implement segment_ids(seq)"
        )

    def is_causal(self, seq: TokenSequence) -> bool:
        """Whether the mask equals the plain causal mask at every real token of ``seq``."""
        return False

    def spec(self, seq: TokenSequence) -> MaskSpec:
        """What the decoder needs to pick a fast attention path."""
        return MaskSpec(self.segment_ids(seq), seq.valid, self.is_causal(seq))

    def __call__(self, seq: TokenSequence) -> Bool[Tensor, "b n n"]:
        return self.spec(seq).dense()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@recorded
class CausalMask(MaskPolicy):
    """Every token sees itself and the real tokens before it (OpenVLA, Llama)."""

    def segment_ids(self, seq: TokenSequence) -> Int[Tensor, "b n"]:
        b, n = seq.valid.shape
        return torch.arange(n, device=seq.valid.device).expand(b, n)

    def is_causal(self, seq: TokenSequence) -> bool:
        # Padding only at row ends: real tokens never see it under plain causal attention.
        return seq.right_padded


@recorded
class BidirectionalMask(MaskPolicy):
    """Every real token sees every real token (OpenVLA-OFT's parallel decoding)."""

    def segment_ids(self, seq: TokenSequence) -> Int[Tensor, "b n"]:
        return torch.zeros_like(seq.valid, dtype=torch.long)


@recorded
class PrefixLMMask(MaskPolicy):
    """Prefix both ways, suffix (``seq.is_suffix``) causally (PaliGemma)."""

    def segment_ids(self, seq: TokenSequence) -> Int[Tensor, "b n"]:
        return torch.cumsum(seq.is_suffix.long(), dim=1)


@recorded
class ParallelDecodingMask(MaskPolicy):
    """The suffix (``seq.is_suffix``: action slots, a timestep token, ``</s>``) is one block
    that sees the whole prefix and all of itself; the prefix never sees the suffix.

    The mask for decoding an action chunk in one pass whose prefix can be cached: the prefix
    attends ``"causal"`` (as the language model was trained; default) or
    ``"bidirectional"``ly (PaliGemma's prefix), and a prefix encoded once stays exact for any
    suffix run against it (diffusion and flow-matching steps).

    Args:
        prefix: ``"causal"`` or ``"bidirectional"`` attention inside the prefix.
    """

    def __init__(self, prefix: str = "causal") -> None:
        if prefix not in ("causal", "bidirectional"):
            raise ValueError(f"prefix must be 'causal' or 'bidirectional', got {prefix!r}")
        self.prefix = prefix

    def segment_ids(self, seq: TokenSequence) -> Int[Tensor, "b n"]:
        b, n = seq.valid.shape
        if self.prefix == "causal":
            index = torch.arange(n, device=seq.valid.device).expand(b, n)
        else:
            index = torch.zeros(b, n, dtype=torch.long, device=seq.valid.device)
        # the suffix shares one segment past every prefix token: the prefix's last segment
        # plus one, and suffix segments never decrease (padding follows the suffix)
        suffix = seq.is_suffix.long()
        first_suffix = torch.where(seq.is_suffix, index, n).amin(dim=1, keepdim=True)  # [b, 1]
        return torch.where(torch.cumsum(suffix, 1) > 0, first_suffix + n, index)

    def __repr__(self) -> str:
        return f"ParallelDecodingMask(prefix={self.prefix!r})"


@recorded
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
                    raise ValueError(
                        f"role {TokenRole(role).name} is listed twice (in block "
                        f"{self.block_of[int(role)]} and again in block {index}); each role "
                        f"may appear once, in one block"
                    )
                seen.add(role)
                self.block_of[int(role)] = index
        self.blocks = [sorted(TokenRole(r) for r in block) for block in blocks]
        self._tables: dict[torch.device, Tensor] = {}

    def segment_ids(self, seq: TokenSequence) -> Int[Tensor, "b n"]:
        device = seq.roles.device
        table = self._tables.get(device)
        if table is None:  # one host-to-device copy per device, not per call
            values = [self.block_of.get(int(role), 0) for role in TokenRole]
            table = self._tables[device] = torch.tensor(values, dtype=torch.long, device=device)
        return table[seq.roles]

    def __repr__(self) -> str:
        names = [[r.name for r in block] for block in self.blocks]
        return f"RoleBlockMask({names})"
