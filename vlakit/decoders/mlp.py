"""Gated feed-forward blocks: SwiGLU (Llama) and GeGLU (Gemma)."""

from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.core.recording import recorded

__all__ = ["GatedMLP"]


@recorded
class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``.

    SwiGLU is ``activation=nn.SiLU()``; Gemma's GeGLU is ``nn.GELU(approximate="tanh")``.

    Args:
        dim: model width ``d``.
        mlp_dim: inner width ``f``.
        activation: applied to the gate branch.
        bias: give the three projections a bias.
        linear: builds ``gate_proj``, ``up_proj``, ``down_proj``, called as
            ``linear(in_features, out_features, bias=...)`` (default ``nn.Linear``).
    """

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        activation: nn.Module,
        bias: bool = False,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        self.gate_proj = linear(dim, mlp_dim, bias=bias)
        self.up_proj = linear(dim, mlp_dim, bias=bias)
        self.down_proj = linear(mlp_dim, dim, bias=bias)
        self.activation = activation

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))
