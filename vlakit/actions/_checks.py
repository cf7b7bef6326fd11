"""Input checks shared by the action tokenizer and the normalizer (private)."""

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_tensor", "check_last_dim", "check_finite"]


def as_tensor(x: Tensor | np.ndarray, what: str) -> Tensor:
    """Return ``x`` as a tensor; a numpy array is copied (numpy is a convenience input)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.tensor(x)
    raise TypeError(f"{what} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def check_last_dim(x: Tensor, expected: int, what: str, source: str) -> None:
    """Raise a ``ValueError`` unless ``x`` is ``[*batch, expected]``. Shape-only: compile-safe.

    ``source`` says where ``expected`` comes from (``"action_dim"``, ``"the statistics"``).
    """
    if x.dim() == 0:
        raise ValueError(
            f"{what} must have a last dimension of size {expected} ({source}), got a 0-d "
            f"tensor (a single number)"
        )
    if x.shape[-1] != expected:
        raise ValueError(
            f"{what} has last dimension {x.shape[-1]}, expected {expected} ({source}); "
            f"shape {tuple(x.shape)}"
        )


def check_finite(x: Tensor, what: str) -> None:
    """Raise a ``ValueError`` counting NaN and infinite entries of ``x``.

    Reads a value back to Python, so it is skipped while ``torch.compile`` traces.
    """
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return
    if not x.is_floating_point() or bool(torch.isfinite(x).all()):
        return
    num_nan = int(torch.isnan(x).sum())
    num_inf = int(torch.isinf(x).sum())
    raise ValueError(
        f"{what} contains {num_nan} NaN and {num_inf} infinite value(s) out of {x.numel()} "
        f"(shape {tuple(x.shape)})"
    )
