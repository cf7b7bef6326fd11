import contextlib

import torch


def on_device(device: torch.device | str | None):
    """``with torch.device(device)`` when a device is given, else a no-op context."""
    return contextlib.nullcontext() if device is None else torch.device(device)
