"""The linear-layer factory leaf blocks receive, so LoRA, quantised or FP8 linears plug in."""

from collections.abc import Callable

from torch import nn

__all__ = ["LinearFactory"]

LinearFactory = Callable[..., nn.Module]
"""Called as ``linear(in_features, out_features, bias=...)``; returns a module mapping
``[..., in_features] -> [..., out_features]``. The default everywhere is ``torch.nn.Linear``.
A block stores what the factory returns under its usual attribute name (``q_proj``,
``qkv``, ``fc1``...), so name-based targeting (PEFT's ``target_modules``) keeps working."""
