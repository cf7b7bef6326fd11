"""Concatenate sequence pieces and move each row's padding to its end."""

import torch
from torch import Tensor

from vlakit.core import IGNORE_ID, TokenRole, TokenSequence, positions_from_valid


class _Piece:
    """One block of tokens with its per-token fields (all ``[b, k]`` but ``embeds``)."""

    __slots__ = ("embeds", "roles", "token_ids", "valid", "is_suffix")

    def __init__(
        self, embeds: Tensor, roles: Tensor, token_ids: Tensor, valid: Tensor, is_suffix: Tensor
    ) -> None:
        self.embeds = embeds  # [b, k, d]
        self.roles = roles
        self.token_ids = token_ids
        self.valid = valid
        self.is_suffix = is_suffix


def _piece(
    embeds: Tensor,
    role: TokenRole | Tensor,
    token_ids: Tensor | None = None,
    valid: Tensor | None = None,
    suffix: bool | Tensor = False,
) -> _Piece:
    b, k = embeds.shape[:2]
    device = embeds.device
    if isinstance(role, Tensor):
        roles = role
    else:
        roles = torch.full((b, k), int(role), dtype=torch.long, device=device)
    if token_ids is None:
        token_ids = torch.full((b, k), IGNORE_ID, dtype=torch.long, device=device)
    if valid is None:
        valid = torch.ones(b, k, dtype=torch.bool, device=device)
    if not isinstance(suffix, Tensor):
        suffix = torch.full((b, k), suffix, dtype=torch.bool, device=device)
    return _Piece(embeds, roles, token_ids, valid, suffix)


def _pack(
    pieces: list[_Piece], position_offset: int, num_image_tokens: int | None = None
) -> TokenSequence:
    """Concatenate pieces along the sequence and stable-sort each row's real tokens first.

    Real tokens keep their relative order, so text padding in the middle of the concatenation
    (prompts of different lengths followed by action slots) moves to the end of the row.
    """
    dtype = pieces[0].embeds.dtype  # the decoder's embedding dtype (first piece is text)
    embeds = torch.cat([p.embeds.to(dtype) for p in pieces], 1)  # [b, n, d]
    valid = torch.cat([p.valid for p in pieces], 1)  # [b, n]
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # [b, n]

    def take(name: str) -> Tensor:
        return torch.gather(torch.cat([getattr(p, name) for p in pieces], 1), 1, order)

    valid = torch.gather(valid, 1, order)
    embeds = torch.gather(embeds, 1, order[..., None].expand(-1, -1, embeds.shape[-1]))
    embeds = embeds * valid[..., None].to(embeds.dtype)
    return TokenSequence(
        embeds=embeds,
        roles=torch.where(valid, take("roles"), int(TokenRole.PAD)),
        positions=positions_from_valid(valid) + position_offset,
        valid=valid,
        is_suffix=take("is_suffix") & valid,
        token_ids=torch.where(valid, take("token_ids"), IGNORE_ID),
        right_padded=True,
        num_image_tokens=num_image_tokens,
    )


def _concat(pieces: list[_Piece]) -> TokenSequence:
    """Concatenate pieces as they are (no padding to move), positions from 0."""
    dtype = pieces[0].embeds.dtype
    valid = torch.cat([p.valid for p in pieces], 1)
    return TokenSequence(
        embeds=torch.cat([p.embeds.to(dtype) for p in pieces], 1),
        roles=torch.cat([p.roles for p in pieces], 1),
        positions=positions_from_valid(valid),
        valid=valid,
        is_suffix=torch.cat([p.is_suffix for p in pieces], 1),
        token_ids=torch.cat([p.token_ids for p in pieces], 1),
        right_padded=True,
    )
