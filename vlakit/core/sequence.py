"""TokenSequence: embeddings with, in step, a role, a position and a padding flag per token."""

import dataclasses

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlakit.core.roles import TokenRole

__all__ = ["TokenSequence", "IGNORE_ID"]

IGNORE_ID = -100
"""``token_ids`` value for tokens that did not come from the vocabulary (images, proprio...)."""


@dataclasses.dataclass
class TokenSequence:
    """One interleaved sequence batch, every per-token field aligned with ``embeds``.

    Attributes:
        embeds: ``[b, n, d]`` input embeddings.
        roles: ``[b, n]`` [`TokenRole`][vlakit.core.TokenRole] values (``PAD`` on padding).
        positions: ``[b, n]`` RoPE positions.
        valid: ``[b, n]`` ``True`` for real tokens, ``False`` for padding.
        is_suffix: ``[b, n]`` ``True`` for tokens of the causal suffix in a prefix-LM split
            (PaliGemma's ``token_type_ids == 1``; action slots).
        token_ids: ``[b, n]`` vocabulary id of each token, ``IGNORE_ID`` (-100) for tokens
            that have none (image patches, proprio, padding). Language-model losses read
            their targets here.
        right_padded: a static fact, not a tensor: every row's padding sits at its end
            (the interleavers guarantee it). A causal mask policy uses it to let the
            decoder take SDPA's ``is_causal`` fast path.
        num_image_tokens: a static fact, not a tensor: every row holds this many ``IMAGE``
            tokens in one contiguous block (the interleavers set it from the image tokens'
            shape, all views together), or ``None`` when unknown (e.g. after a pruner kept
            a different count per row). Pruners read it to keep shapes static; without it
            they count the roles (one device read).

    Blocks that drop or reorder tokens (pruners) use [`gather`][vlakit.core.TokenSequence.gather],
    which keeps every
    field in step.
    """

    embeds: Float[Tensor, "b n d"]
    roles: Int[Tensor, "b n"]
    positions: Int[Tensor, "b n"]
    valid: Bool[Tensor, "b n"]
    is_suffix: Bool[Tensor, "b n"]
    token_ids: Int[Tensor, "b n"]
    right_padded: bool = False
    num_image_tokens: int | None = None

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def role_mask(self, *roles: TokenRole) -> Bool[Tensor, "b n"]:
        """``True`` where the token has one of ``roles``."""
        out = torch.zeros_like(self.valid)
        for role in roles:
            out = out | (self.roles == int(role))
        return out

    def gather(self, index: Int[Tensor, "b m"]) -> "TokenSequence":
        """Keep tokens ``index [b, m]`` of each row, in that order (all fields in step).

        The static facts (``right_padded``, ``num_image_tokens``) are dropped: a gather may
        reorder or drop tokens; a caller that knows them passes them to
        [replace][vlakit.core.TokenSequence.replace]."""
        d = self.embeds.shape[-1]
        return TokenSequence(
            embeds=torch.gather(self.embeds, 1, index[..., None].expand(-1, -1, d)),
            roles=torch.gather(self.roles, 1, index),
            positions=torch.gather(self.positions, 1, index),
            valid=torch.gather(self.valid, 1, index),
            is_suffix=torch.gather(self.is_suffix, 1, index),
            token_ids=torch.gather(self.token_ids, 1, index),
        )

    def replace(self, **changes) -> "TokenSequence":
        """A copy with some fields replaced (traceable by ``torch.compile``, unlike
        ``dataclasses.replace``). Replacing ``valid`` drops ``right_padded`` unless it is
        given too, so a pruner that marks tokens invalid keeps masks exact."""
        fields = {
            "embeds": self.embeds,
            "roles": self.roles,
            "positions": self.positions,
            "valid": self.valid,
            "is_suffix": self.is_suffix,
            "token_ids": self.token_ids,
            "right_padded": self.right_padded,
            "num_image_tokens": self.num_image_tokens,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(
                f"TokenSequence has no field {sorted(unknown)[0]!r}; its fields are "
                f"{list(fields)}"
            )
        if "valid" in changes and "right_padded" not in changes:
            fields["right_padded"] = False  # new validity: padding may no longer be at the end
        if "roles" in changes and "num_image_tokens" not in changes:
            fields["num_image_tokens"] = None  # new roles: the image count may have changed
        fields.update(changes)
        return TokenSequence(**fields)
