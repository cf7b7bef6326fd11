"""RMSNorm in both conventions, computed in fp32."""

import torch
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.recording import recorded

__all__ = ["RMSNorm"]


@recorded
class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * w`` (Llama) or ``* (1 + w)`` (Gemma).

    The statistics are computed in fp32 whatever the input dtype. The two conventions also
    differ in where they cast back, and both are reproduced exactly:

    - ``unit_offset=False`` (Llama): ``w * normed.to(x.dtype)``; weight initialised to 1.
    - ``unit_offset=True`` (Gemma): ``(normed * (1 + w.float())).to(x.dtype)``; weight
      initialised to 0.

    Args:
        dim: width ``d`` of the last axis.
        eps: added to the mean square before the square root.
        unit_offset: use the ``(1 + w)`` convention.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, unit_offset={self.unit_offset}"
