"""Initialising parameters of a model built on the ``meta`` device."""

from torch import nn

__all__ = ["init_parameters"]


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
        if callable(reset):
            reset()
    return module
