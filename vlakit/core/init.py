"""Building on a device and in a dtype, and initialising a model built on ``meta``."""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["init_parameters", "building"]


@contextlib.contextmanager
def building(dtype: torch.dtype | None, device: torch.device | str | None) -> Iterator[None]:
    """Create parameters directly on ``device`` and in ``dtype``: ``with torch.device``
    and torch's default dtype set for the duration (then restored, also on error).
    ``None`` leaves either as it is. Computations that must stay fp32 (RoPE angles, RMSNorm
    statistics) ask for fp32 explicitly, so they are unaffected. Builders use it so that
    ``openvla_7b(dtype=torch.bfloat16)`` never materialises an fp32 copy first."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype such as torch.bfloat16, got {dtype}")
    previous = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
        if dtype is not None:
            torch.set_default_dtype(dtype)
            stack.callback(torch.set_default_dtype, previous)
        yield


def init_parameters(module: nn.Module) -> nn.Module:
    """Call ``reset_parameters()`` on ``module`` and every submodule that defines it.

    Every vlakit block that owns parameters directly (not through a submodule) defines
    ``reset_parameters`` for them, as torch's own layers do, so after
    ``model.to_empty(device=...)`` this call leaves no parameter at ``to_empty``'s garbage.
    Submodules are visited children-first, so a parent may override a child's default
    initialisation (e.g. zero-initialised FiLM). Returns ``module``.
    """
    for sub in reversed(list(module.modules())):
        reset = getattr(sub, "reset_parameters", None)
        if reset is None and isinstance(sub, nn.MultiheadAttention):
            reset = sub._reset_parameters  # torch's one layer with another name for it
        if callable(reset):
            reset()
    return module
