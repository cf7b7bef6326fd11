"""Gated feed-forward blocks: SwiGLU (Llama) and GeGLU (Gemma)."""

from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["GatedMLP"]


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``.

    SwiGLU is ``activation=nn.SiLU()``; Gemma's GeGLU is ``nn.GELU(approximate="tanh")``.

    Args:
        dim: model width ``d``.
        hidden_dim: inner width ``f``.
        activation: applied to the gate branch.
        bias: give the three projections a bias.
    """

    def __init__(
        self, dim: int, hidden_dim: int, activation: nn.Module, bias: bool = False
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.activation = activation

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))
