"""Attention-mask builders.

Every builder returns a boolean mask ``[b, q, k]`` where ``True`` means *query ``q`` may
attend to key ``k``*. Masks are always explicit inputs to the decoders; nothing in vlakit
guesses a mask from the absence of one.

All masks derive from one rule over per-token **segment ids**: query ``i`` may attend key
``j`` when ``segment[j] <= segment[i]`` and ``j`` is not padding. Equal ids give a
bidirectional block, increasing ids give causal order between blocks:

- causal: ``segment = [0, 1, 2, ...]``
- bidirectional: ``segment = [0, 0, 0, ...]``
- prefix-LM (PaliGemma): prefix tokens share segment 0, each suffix token opens a new one
- pi0-style blocks: ``[prefix.., state, action, action, ...] -> [0.., 1, 2, 2, ...]``

A padding query keeps attention to itself so that no row is empty (an empty row makes
``scaled_dot_product_attention`` return NaN); its output is meaningless and ignored.
"""

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = [
    "segment_mask",
    "causal_mask",
    "bidirectional_mask",
    "prefix_lm_mask",
    "positions_from_valid",
    "check_mask_shape",
    "MaskSpec",
]


def segment_mask(
    segment_ids: Int[Tensor, "b n"], valid: Bool[Tensor, "b n"]
) -> Bool[Tensor, "b n n"]:
    """Block mask from per-token segment ids (see module docstring).

    Args:
        segment_ids: ``[b, n]`` non-decreasing block index per token.
        valid: ``[b, n]`` ``True`` for real tokens, ``False`` for padding.

    Returns:
        ``[b, n, n]`` boolean mask, ``True`` where attention is allowed.
    """
    allowed = segment_ids[:, None, :] <= segment_ids[:, :, None]  # [b, q, k]
    allowed = allowed & valid[:, None, :]
    n = segment_ids.shape[1]
    diagonal = torch.eye(n, dtype=torch.bool, device=segment_ids.device)
    return allowed | diagonal


def causal_mask(valid: Bool[Tensor, "b n"]) -> Bool[Tensor, "b n n"]:
    """Causal mask with padding: each token sees itself and earlier real tokens."""
    b, n = valid.shape
    segment_ids = torch.arange(n, device=valid.device).expand(b, n)
    return segment_mask(segment_ids, valid)


def bidirectional_mask(valid: Bool[Tensor, "b n"]) -> Bool[Tensor, "b n n"]:
    """Every real token sees every real token."""
    segment_ids = torch.zeros_like(valid, dtype=torch.long)
    return segment_mask(segment_ids, valid)


def prefix_lm_mask(
    is_suffix: Bool[Tensor, "b n"], valid: Bool[Tensor, "b n"]
) -> Bool[Tensor, "b n n"]:
    """Prefix-LM mask (PaliGemma): the prefix attends both ways, the suffix causally.

    Args:
        is_suffix: ``[b, n]`` ``True`` for suffix tokens (PaliGemma's ``token_type_ids == 1``).
            Prefix tokens must come before suffix tokens.
        valid: ``[b, n]`` ``True`` for real tokens.
    """
    segment_ids = torch.cumsum(is_suffix.long(), dim=1)
    return segment_mask(segment_ids, valid)


def positions_from_valid(valid: Bool[Tensor, "b n"]) -> Int[Tensor, "b n"]:
    """RoPE positions that skip padding: ``cumsum(valid) - 1``, clamped at 0.

    With left padding the first real token gets position 0, as in transformers' generation.
    """
    return (torch.cumsum(valid.long(), dim=1) - 1).clamp_min(0)


def check_mask_shape(mask: Tensor, batch: int, queries: int, keys: int) -> None:
    """Raise a ``ValueError`` naming the offending dimension if ``mask`` is not ``[b, q, k]``."""
    if mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
    if mask.dim() != 3:
        raise ValueError(
            f"attention mask must be [batch, queries, keys] = [{batch}, {queries}, {keys}], "
            f"got {mask.dim()} dims {tuple(mask.shape)}"
        )
    for name, got, want in zip(("batch", "queries", "keys"), mask.shape, (batch, queries, keys)):
        if got != want:
            raise ValueError(
                f"attention mask {name} dimension is {got}, expected {want} "
                f"(mask shape {tuple(mask.shape)}, expected [{batch}, {queries}, {keys}])"
            )


class MaskSpec:
    """What a mask policy knows about a sequence's attention, before it is made dense.

    A dense ``[b, n, n]`` boolean keeps ``scaled_dot_product_attention`` off its fused
    kernels; a decoder that receives a ``MaskSpec`` instead can choose: SDPA's
    ``is_causal`` fast path when `is_causal` holds, else the dense mask from
    `dense`. Both give the same hidden states at every real token.

    Args:
        segment_ids: ``[b, n]`` segment per token (see [`segment_mask`][vlakit.core.segment_mask]).
        valid: ``[b, n]`` ``True`` for real tokens.
        is_causal: ``True`` when, at every real query, the mask equals the plain causal
            mask (a causal policy over a right-padded sequence: real tokens never see the
            padding after them). Padding queries may differ; their outputs are ignored.
    """

    __slots__ = ("segment_ids", "valid", "is_causal")

    def __init__(
        self,
        segment_ids: Int[Tensor, "b n"],
        valid: Bool[Tensor, "b n"],
        is_causal: bool = False,
    ) -> None:
        self.segment_ids = segment_ids
        self.valid = valid
        self.is_causal = is_causal

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(b, n, n)``: the shape of `dense`."""
        b, n = self.valid.shape
        return (b, n, n)

    def dense(self) -> Bool[Tensor, "b n n"]:
        """The boolean mask ``[b, n, n]`` (``True`` = may attend)."""
        return segment_mask(self.segment_ids, self.valid)

    def rows(self, start: int) -> Bool[Tensor, "b q n"]:
        """Rows ``start..n-1`` of [dense][vlakit.core.MaskSpec.dense] without building the
        rest: the mask of suffix queries against ``prefix + suffix`` keys."""
        n = self.valid.shape[1]
        queries = self.segment_ids[:, start:, None]  # [b, q, 1]
        allowed = (self.segment_ids[:, None, :] <= queries) & self.valid[:, None, :]
        diagonal = torch.arange(start, n, device=queries.device)[:, None] == torch.arange(
            n, device=queries.device
        )
        return allowed | diagonal

    def __repr__(self) -> str:
        return f"MaskSpec(shape={self.shape}, is_causal={self.is_causal})"
