"""Greedy generation with a KV cache, for any vlakit decoder."""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

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
    mask: Bool[Tensor, "b n n"],
    positions: Int[Tensor, "b n"],
    valid: Bool[Tensor, "b n"],
    max_new_tokens: int,
) -> Int[Tensor, "b m"]:
    """Greedy decoding of a fixed number of tokens after a (possibly padded) prompt.

    The prompt is run once through ``decoder`` with ``mask`` (causal, prefix-LM, ...),
    filling a KV cache; then each new token attends to every real prompt token and to the
    tokens generated before it. Padding may sit on either side: the first token is read at
    each row's last real token and new positions continue from there. The loop runs exactly
    ``max_new_tokens`` steps (no data-dependent stopping), so it can be compiled.

    Args:
        decoder: a :class:`~vlakit.decoders.TransformerDecoder` or
            :class:`~vlakit.decoders.HFDecoder` (anything with ``new_cache``, ``forward``,
            ``embed_tokens`` and ``logits``).
        embeds: ``[b, n, d]`` prompt embeddings.
        mask: ``[b, n, n]`` prompt attention mask.
        positions: ``[b, n]`` prompt positions.
        valid: ``[b, n]`` ``True`` for real prompt tokens.
        max_new_tokens: number of tokens ``m`` to produce.

    Returns:
        ``[b, m]`` generated token ids.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = embeds.shape[0]
    rows = torch.arange(b, device=embeds.device)
    cache = decoder.new_cache()
    hidden = decoder(embeds, mask, positions, cache)  # [b, n, d]
    last = last_valid_index(valid)
    h_last = hidden[rows, last][:, None]  # [b, 1, d]
    next_pos = positions[rows, last][:, None] + 1  # [b, 1]
    key_valid = valid
    new_key = torch.ones(b, 1, dtype=torch.bool, device=embeds.device)
    tokens = []
    for step in range(max_new_tokens):
        token = decoder.logits(h_last).argmax(dim=-1)  # [b, 1]
        tokens.append(token)
        if step + 1 == max_new_tokens:
            break
        key_valid = torch.cat((key_valid, new_key), dim=1)  # [b, k]
        h_last = decoder(decoder.embed_tokens(token), key_valid[:, None, :], next_pos, cache)
        next_pos = next_pos + 1
    return torch.cat(tokens, dim=1)
