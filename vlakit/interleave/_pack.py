"""Concatenate sequence pieces and move each row's padding to its end."""

import dataclasses

import torch
from torch import Tensor

from vlakit.core import IGNORE_ID, TokenRole, TokenSequence, positions_from_valid


@dataclasses.dataclass
class _Piece:
    embeds: Tensor  # [b, k, d]
    roles: Tensor  # [b, k]
    token_ids: Tensor  # [b, k]
    valid: Tensor  # [b, k]
    is_suffix: Tensor  # [b, k]


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


def _pack(pieces: list[_Piece], position_offset: int) -> TokenSequence:
    """Concatenate pieces along the sequence and stable-sort each row's real tokens first.

    Real tokens keep their relative order, so text padding in the middle of the concatenation
    (prompts of different lengths followed by action slots) moves to the end of the row.
    """
    dtype = pieces[0].embeds.dtype  # the decoder's embedding dtype (first piece is text)
    pieces = [dataclasses.replace(p, embeds=p.embeds.to(dtype)) for p in pieces]
    cat = {
        f.name: torch.cat([getattr(p, f.name) for p in pieces], 1)
        for f in dataclasses.fields(_Piece)
    }
    order = torch.argsort((~cat["valid"]).to(torch.int8), dim=1, stable=True)  # [b, n]
    gather = {k: torch.gather(v, 1, order) for k, v in cat.items() if k != "embeds"}
    d = cat["embeds"].shape[-1]
    embeds = torch.gather(cat["embeds"], 1, order[..., None].expand(-1, -1, d))
    valid = gather["valid"]
    embeds = embeds * valid[..., None].to(embeds.dtype)
    roles = torch.where(valid, gather["roles"], int(TokenRole.PAD))
    token_ids = torch.where(valid, gather["token_ids"], IGNORE_ID)
    return TokenSequence(
        embeds=embeds,
        roles=roles,
        positions=positions_from_valid(valid) + position_offset,
        valid=valid,
        is_suffix=gather["is_suffix"] & valid,
        token_ids=token_ids,
    )
