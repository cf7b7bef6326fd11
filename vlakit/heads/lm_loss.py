"""Next-token cross-entropy over selected target tokens."""

from collections.abc import Callable

import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["next_token_loss"]

def next_token_loss(
    hidden: Float[Tensor, "b n d"],
    token_ids: Int[Tensor, "b n"],
    targets: Bool[Tensor, "b n"],
    logits_fn: Callable[[Tensor], Tensor],
) -> Float[Tensor, ""]:
    """Mean cross-entropy of predicting ``token_ids[i]`` from ``hidden[i - 1]`` where
    ``targets[i]``.

    Only the selected positions go through ``logits_fn`` (the LM head), so the full
    ``[b, n, V]`` logits tensor is never built.

    Args:
        hidden: ``[b, n, d]`` final hidden states.
        token_ids: ``[b, n]`` target ids.
        targets: ``[b, n]`` which tokens are predicted (never position 0).
        logits_fn: ``[k, d] -> [k, V]``.
    """
    select = targets[:, 1:]  # token i is predicted by hidden i - 1
    logits = logits_fn(hidden[:, :-1][select])  # [k, V]
    return F.cross_entropy(logits.float(), token_ids[:, 1:][select])

