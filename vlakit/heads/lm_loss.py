"""Next-token cross-entropy over selected target tokens."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlakit.core import IGNORE_ID
from vlakit.core.checks import should_validate

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
        max_targets: at most this many targets per row; a row with more raises a
            ``ValueError`` (a value check, see [`validation`][vlakit.core.validation]).

    Returns:
        the mean over all targets of the batch; 0 (not NaN) when there are none.
    """
    select = targets[:, 1:]  # token i is predicted by hidden i - 1
    inputs, labels = hidden[:, :-1], token_ids[:, 1:]
    if max_targets is not None:
        k = min(max_targets, select.shape[1])
        if should_validate(select):
            most = int(select.sum(dim=1).max()) if select.numel() else 0
            if most > k:
                raise ValueError(
                    f"a row has {most} target tokens but the loss was told to expect at most "
                    f"{k} (max_targets): the sequence holds more target tokens than the head "
                    f"placed"
                )
        order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :k]  # [b, k]
        picked = torch.gather(inputs, 1, order[..., None].expand(-1, -1, inputs.shape[-1]))
        labels = torch.where(
            torch.gather(select, 1, order), torch.gather(labels, 1, order), IGNORE_ID
        )
        return _mean_ignoring(logits_fn(picked), labels)  # logits [b, k, V]
    if torch.compiler.is_compiling():
        labels = torch.where(select, labels, IGNORE_ID)
        return _mean_ignoring(logits_fn(inputs), labels)  # logits [b, n - 1, V]
    logits = logits_fn(inputs[select])  # [k, V]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0  # no targets: zero, still part of the graph
    return F.cross_entropy(logits.float(), labels[select])


def _mean_ignoring(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over labels that are not ``IGNORE_ID``; 0 when there are none."""
    total = F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_ID, reduction="sum"
    )
    return total / (labels != IGNORE_ID).sum().clamp_min(1)
