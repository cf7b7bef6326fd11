"""Sinusoidal embeddings of a diffusion timestep or a flow-matching time."""

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["sinusoidal_embedding", "sincos_time_embedding"]


def sinusoidal_embedding(
    t: Float[Tensor, " b"] | Int[Tensor, " b"], dim: int
) -> Float[Tensor, "b dim"]:
    """OpenVLA-OFT's diffusion timestep embedding: ``[sin(t f), cos(t f)]`` with frequencies
    ``f_i = exp(-log(10000) i / (dim/2 - 1))``, ``i = 0..dim/2-1`` (float32)."""
    if dim % 2:
        raise ValueError(f"the embedding width must be even, got {dim}")
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, device=t.device) / (half - 1)
    angles = t.to(torch.float32)[:, None] * torch.exp(exponent)[None]  # [b, half]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def sincos_time_embedding(
    t: Float[Tensor, " b"], dim: int, min_period: float = 4e-3, max_period: float = 4.0
) -> Float[Tensor, "b dim"]:
    """pi0's flow-matching time embedding: ``[sin(2 pi t / p), cos(2 pi t / p)]`` with
    periods ``p`` spaced geometrically from ``min_period`` to ``max_period`` (both ends
    included), computed in float64 and returned in float32."""
    if dim % 2:
        raise ValueError(f"the embedding width must be even, got {dim}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angles = t.to(torch.float64)[:, None] * (2 * math.pi / period)[None]  # [b, dim/2]
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(torch.float32)
