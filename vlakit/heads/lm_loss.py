"""Next-token cross-entropy over selected target tokens."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlakit.core import IGNORE_ID

__all__ = ["next_token_loss"]


def next_token_loss(
    hidden: Float[Tensor, "b n d"],
    token_ids: Int[Tensor, "b n"],
    targets: Bool[Tensor, "b n"],
    logits_fn: Callable[[Tensor], Tensor],
    max_targets: int | None = None,
) -> Float[Tensor, ""]:
    """Mean cross-entropy of predicting ``token_ids[i]`` from ``hidden[i - 1]`` where
    ``targets[i]``.

    Only the selected positions go through ``logits_fn`` (the LM head), so the full
    ``[b, n, V]`` logits tensor is never built. With ``max_targets`` (a static bound on
    targets per row, e.g. a discrete head's action tokens + ``</s>``) the selection has
    fixed shapes and compiles without graph breaks; without it, eager code selects with a
    boolean mask and compiled code computes every position with ``IGNORE_ID`` targets.

    Args:
        hidden: ``[b, n, d]`` final hidden states.
        token_ids: ``[b, n]`` target ids.
        targets: ``[b, n]`` which tokens are predicted (never position 0).
        logits_fn: ``[..., d] -> [..., V]``.
        max_targets: at most this many targets per row (rows with more lose the extra ones:
            pass a true bound).
    """
    select = targets[:, 1:]  # token i is predicted by hidden i - 1
    inputs, labels = hidden[:, :-1], token_ids[:, 1:]
    if max_targets is not None:
        k = min(max_targets, select.shape[1])
        order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :k]  # [b, k]
        picked = torch.gather(inputs, 1, order[..., None].expand(-1, -1, inputs.shape[-1]))
        labels = torch.where(
            torch.gather(select, 1, order), torch.gather(labels, 1, order), IGNORE_ID
        )
        logits = logits_fn(picked)  # [b, k, V]
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_ID
        )
    if torch.compiler.is_compiling():
        labels = torch.where(select, labels, IGNORE_ID)
        logits = logits_fn(inputs)  # [b, n - 1, V]
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_ID
        )
    logits = logits_fn(inputs[select])  # [k, V]
    return F.cross_entropy(logits.float(), labels[select])
