"""The validation switch: data-dependent input checks that cost a host sync on a GPU.

Checks that only look at shapes always run. Checks that look at values (token ids inside
the vocabulary, positions inside the RoPE table) read a tensor back to the host, which on
a GPU stalls the stream. They run:

- on CPU tensors, always (reading them back costs nothing);
- on accelerator tensors, while validation is on, which it is by default;
- never inside ``torch.compile`` (traced code must not read tensor values).

Turn it off for production GPU loops once inputs are known good::

    import vlakit
    vlakit.set_validation(False)          # process-wide
    with vlakit.validation(False):        # or for a block of code
        actions = model.predict_action(batch)
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["set_validation", "validation", "validation_enabled", "should_validate"]

_ENABLED = True


def set_validation(enabled: bool) -> None:
    """Turn value checks on accelerator tensors on or off for the whole process."""
    global _ENABLED
    _ENABLED = bool(enabled)


def validation_enabled() -> bool:
    """Whether value checks on accelerator tensors are on (default ``True``)."""
    return _ENABLED


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager setting `set_validation` for a block, then restoring it."""
    global _ENABLED
    previous = _ENABLED
    _ENABLED = bool(enabled)
    try:
        yield
    finally:
        _ENABLED = previous


def should_validate(tensor: Tensor) -> bool:
    """Whether a value check on ``tensor`` runs now (see the module docstring)."""
    if torch.compiler.is_compiling() or tensor.device.type == "meta":
        return False
    return tensor.device.type == "cpu" or _ENABLED
