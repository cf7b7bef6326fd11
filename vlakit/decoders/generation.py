"""Greedy generation with a KV cache, for any vlakit decoder."""

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core.masks import MaskSpec

__all__ = ["greedy_generate", "last_valid_index"]


def last_valid_index(valid: Bool[Tensor, "b n"]) -> Int[Tensor, " b"]:
    """Index of the last real token in each row (works for left and right padding)."""
    n = valid.shape[1]
    idx = torch.arange(n, device=valid.device).expand_as(valid)
    return torch.where(valid, idx, -1).amax(dim=1)


@torch.no_grad()
def greedy_generate(
    decoder: nn.Module,
    embeds: Float[Tensor, "b n d"],
    mask: Bool[Tensor, "b n n"] | MaskSpec,
    positions: Int[Tensor, "b n"],
    valid: Bool[Tensor, "b n"],
    max_new_tokens: int,
    step: Callable[..., Tensor] | None = None,
) -> Int[Tensor, "b m"]:
    """Greedy decoding of a fixed number of tokens after a (possibly padded) prompt.

    The prompt is run once through ``decoder`` with ``mask`` (causal, prefix-LM, ...),
    filling a KV cache preallocated to ``n + max_new_tokens`` positions (where the decoder
    supports it: ``decoder.new_cache(max_len=...)``); then each new token attends to every
    real prompt token and to the tokens generated before it. Padding may sit on either
    side: the first token is read at each row's last real token and new positions continue
    from there. The loop runs exactly ``max_new_tokens`` steps (no data-dependent stopping)
    and every step has the same shapes, so a compiled step compiles once per prompt length::

        step = torch.compile(decoder, fullgraph=True, dynamic=False)
        ids = greedy_generate(decoder, embeds, mask, positions, valid, 7, step=step)

    Args:
        decoder: a [`Decoder`][vlakit.decoders.Decoder]
            ([`TransformerDecoder`][vlakit.decoders.TransformerDecoder],
            [`HFDecoder`][vlakit.decoders.HFDecoder]); its cache tells with
            ``is_preallocated`` whether it has a fixed number of slots.
        embeds: ``[b, n, d]`` prompt embeddings.
        mask: ``[b, n, n]`` prompt attention mask, or a [`MaskSpec`][vlakit.core.MaskSpec].
        positions: ``[b, n]`` prompt positions.
        valid: ``[b, n]`` ``True`` for real prompt tokens.
        max_new_tokens: number of tokens ``m`` to produce.
        step: runs the one-token steps in place of ``decoder`` (e.g. a compiled decoder);
            same call signature as ``decoder``.

    Returns:
        ``[b, m]`` generated token ids.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    step = decoder if step is None else step
    b, n = embeds.shape[:2]
    rows = torch.arange(b, device=embeds.device)
    total = n + max_new_tokens - 1  # the last token is never fed back
    cache = decoder.new_cache(max_len=total)
    hidden = decoder(embeds, mask, positions, cache)  # [b, n, d]
    last = last_valid_index(valid)
    h_last = hidden[rows, last][:, None]  # [b, 1, d]
    next_pos = positions[rows, last][:, None] + 1  # [b, 1]
    preallocated = cache.is_preallocated
    if preallocated:
        key_valid = torch.zeros(b, total, dtype=torch.bool, device=embeds.device)
        key_valid[:, :n] = valid
    else:
        key_valid = valid
    new_key = torch.ones(b, 1, dtype=torch.bool, device=embeds.device)
    tokens = []
    for i in range(max_new_tokens):
        token = decoder.logits(h_last).argmax(dim=-1)  # [b, 1]
        tokens.append(token)
        if i + 1 == max_new_tokens:
            break
        if preallocated:
            key_valid[:, n + i] = True  # the slot this step writes
        else:
            key_valid = torch.cat((key_valid, new_key), dim=1)  # [b, k]
        h_last = step(decoder.embed_tokens(token), key_valid[:, None, :], next_pos, cache)
        next_pos = next_pos + 1
    return torch.cat(tokens, dim=1)
