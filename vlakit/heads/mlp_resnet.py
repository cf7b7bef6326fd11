"""OpenVLA-OFT's MLPResNet: the network behind its L1 regression and diffusion heads."""

from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.recording import recorded

__all__ = ["MLPResNet", "MLPResNetBlock"]


@recorded
class MLPResNetBlock(nn.Module):
    """``x + ReLU(Linear(LayerNorm(x)))`` at one width (parameter names as in OFT).

    Args:
        dim: the width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        return x + self.ffn(x)


@recorded
class MLPResNet(nn.Module):
    """``LayerNorm -> Linear -> ReLU -> num_blocks x MLPResNetBlock -> LayerNorm -> Linear``.

    LayerNorms are affine with eps 1e-5 (``nn.LayerNorm``'s default, as OFT). The LIBERO L1
    head (``num_blocks=2``, ``in_dim=7*4096``, ``hidden_dim=4096``, ``out_dim=7``) has
    151,117,831 parameters. Parameter names follow OFT's (``layer_norm1``, ``fc1``,
    ``mlp_resnet_blocks``, ``layer_norm2``, ``fc2``), so its head checkpoints load by
    stripping their ``module.`` prefix.

    Args:
        in_dim: input width.
        hidden_dim: width of the residual blocks.
        out_dim: output width.
        num_blocks: residual blocks.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.layer_norm1 = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.relu = nn.ReLU()
        blocks = [MLPResNetBlock(hidden_dim) for _ in range(num_blocks)]
        self.mlp_resnet_blocks = nn.ModuleList(blocks)
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"MLPResNet takes inputs of width {self.in_dim} (its in_dim), got shape "
                f"{tuple(x.shape)}"
            )
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))
