"""Rotary position embedding (the rotate-half layout used by transformers' Llama and Gemma)."""

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlakit.core.recording import recorded

__all__ = ["RotaryEmbedding", "apply_rotary"]


@recorded
class RotaryEmbedding(nn.Module):
    """Computes ``cos, sin [b, n, head_dim]`` for integer positions ``[b, n]``.

    The inverse frequencies ``1 / base^(2i / head_dim)`` are recomputed on each call from
    the positions' device (a ``head_dim / 2`` vector, negligible next to attention), so a
    model built on the ``meta`` device and materialised later needs no buffer fix-up.
    Angles are computed in fp32 and cast to ``dtype``.

    Args:
        head_dim: per-head width (even).
        base: RoPE theta.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(
                f"RoPE (rotary position embedding) rotates pairs of channels, so head_dim "
                f"must be even, got head_dim={head_dim}"
            )
        self.head_dim = head_dim
        self.base = base

    def forward(
        self, positions: Int[Tensor, "b n"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "b n hd"], Float[Tensor, "b n hd"]]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device)
        inv_freq = 1.0 / (self.base ** (exponent.float() / self.head_dim))  # [hd/2]
        freqs = positions[..., None].float() * inv_freq  # [b, n, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [b, n, hd]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: Float[Tensor, "b h n hd"], cos: Float[Tensor, "b n hd"], sin: Float[Tensor, "b n hd"]
) -> Float[Tensor, "b h n hd"]:
    """Rotate queries or keys ``[b, h, n, hd]`` by the angles for their positions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + _rotate_half(x) * sin
