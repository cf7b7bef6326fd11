import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def building(dtype: torch.dtype | None, device: torch.device | str | None) -> Iterator[None]:
    """Create parameters directly on ``device`` and in ``dtype``: ``with torch.device``
    and torch's default dtype set for the duration (then restored). ``None`` leaves either
    as it is. Computations that must stay fp32 (RoPE angles, RMSNorm statistics) ask for
    fp32 explicitly, so they are unaffected."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    previous = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
        if dtype is not None:
            torch.set_default_dtype(dtype)
            stack.callback(torch.set_default_dtype, previous)
        yield
