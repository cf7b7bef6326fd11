"""Projectors: map encoder (or proprio) features into the language model's width.

Every projector declares ``in_dim`` / ``out_dim`` and raises a ``ValueError`` naming the
expected and actual width when its input does not match. Parameter names follow the
reference checkpoints so that their weights load without renaming:

- [`LinearProjector`][vlakit.projectors.LinearProjector]: ``linear`` (PaliGemma
  ``multi_modal_projector.linear``).
- [`MLPProjector`][vlakit.projectors.MLPProjector]: ``fc1, fc2, ...`` (OpenVLA
  ``projector.fc{1,2,3}``).
- [`PixelShuffleProjector`][vlakit.projectors.PixelShuffleProjector]: ``proj`` (Idefics3/SmolVLM
  ``connector.modality_projection.proj``).
- [`ProprioProjector`][vlakit.projectors.ProprioProjector]: ``fc1, fc2`` (OpenVLA-OFT
  ``ProprioProjector``).

Imports nothing else of vlakit.
"""

from collections.abc import Sequence

from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.recording import recorded

__all__ = [
    "LinearProjector",
    "MLPProjector",
    "PixelShuffleProjector",
    "ProprioProjector",
    "pixel_shuffle",
]


def _check_width(module: nn.Module, x: Tensor, expected: int) -> None:
    if x.shape[-1] != expected:
        raise ValueError(
            f"{type(module).__name__} expects input width {expected}, got {x.shape[-1]} "
            f"(input shape {tuple(x.shape)})"
        )


@recorded
class LinearProjector(nn.Module):
    """``Linear(in_dim, out_dim)`` over the last axis (PaliGemma: 1152 → 2048, with bias:
    2,361,344 parameters).

    Args:
        in_dim: input width (the encoder's ``dim``).
        out_dim: output width (the LLM's width).
        bias: add a bias.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        _check_width(self, x, self.in_dim)
        return self.linear(x)


@recorded
class MLPProjector(nn.Module):
    """``fc1 → act → fc2 → act → ... → fcN`` (no activation after the last layer).

    OpenVLA's fused projector is ``MLPProjector([2176, 8704, 4096, 4096])`` with exact
    GELU: 71,385,600 parameters, keys ``fc1, fc2, fc3``. LLaVA-1.5's is
    ``MLPProjector([1024, 4096, 4096])``.

    Args:
        dims: widths ``[in_dim, hidden..., out_dim]`` (at least two: one linear layer).
        activation: applied between layers (stateless, shared); default exact ``nn.GELU()``.
        bias: biases on every layer.
    """

    def __init__(
        self,
        dims: Sequence[int],
        activation: nn.Module | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        widths = [int(d) for d in dims]
        if len(widths) < 2:
            raise ValueError(f"dims needs at least [in_dim, out_dim], got {list(dims)}")
        self.in_dim, self.out_dim = widths[0], widths[-1]
        self.dims = tuple(widths)
        self.num_layers = len(widths) - 1
        for i in range(self.num_layers):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1], bias=bias))
        self.act = activation if activation is not None else nn.GELU()

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        _check_width(self, x, self.in_dim)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = self.act(x)
        return x


def pixel_shuffle(x: Float[Tensor, "b n d"], factor: int) -> Float[Tensor, "b m e"]:
    """Merge each ``factor × factor`` patch neighbourhood into one token (space-to-depth).

    ``[b, s·s, d] -> [b, (s/f)·(s/f), f·f·d]`` for a square grid of side ``s``, in the
    Idefics3 / SmolVLM order: the output token ``(i, j)`` concatenates, for ``a`` then
    ``c`` in ``0..f-1``, the input token ``(i·f + a, j·f + c)``.
    """
    b, n, d = x.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(
            f"pixel_shuffle needs a square token grid, got {n} tokens, which is not a square "
            f"number (e.g. 256 = 16 x 16); drop any class or register tokens before it"
        )
    if side % factor:
        raise ValueError(
            f"grid side {side} is not divisible by the shuffle factor {factor} (the {n} "
            f"tokens form a {side}x{side} grid); use a factor that divides {side}"
        )
    return rearrange(
        x, "b (h fh w fw) d -> b (h w) (fh fw d)", h=side // factor, fh=factor, fw=factor
    )


@recorded
class PixelShuffleProjector(nn.Module):
    """Pixel shuffle (token merge by ``factor²``) then ``Linear`` without bias
    (Idefics3 / SmolVLM connector): ``[b, s², d] -> [b, s²/f², out_dim]``.

    Args:
        in_dim: width ``d`` of the incoming tokens (before the shuffle).
        out_dim: output width.
        factor: merge ``factor × factor`` neighbourhoods (SmolVLM: 3 or 4, Idefics3: 2).
    """

    def __init__(self, in_dim: int, out_dim: int, factor: int) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.in_dim, self.out_dim, self.factor = in_dim, out_dim, factor
        self.proj = nn.Linear(in_dim * factor * factor, out_dim, bias=False)

    def forward(self, x: Float[Tensor, "b n d_in"]) -> Float[Tensor, "b m d_out"]:
        _check_width(self, x, self.in_dim)
        return self.proj(pixel_shuffle(x, self.factor))


@recorded
class ProprioProjector(nn.Module):
    """Proprioceptive state → one LLM-width vector: ``fc2(gelu(fc1(p)))`` (OpenVLA-OFT).

    ``[b, p] -> [b, d]``; the caller adds the token axis (or passes ``[b, 1, p]``).
    OFT LIBERO: 8 → 4096 → 4096, 16,818,176 parameters.

    Args:
        in_dim: proprio width ``p``.
        out_dim: LLM width ``d``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Float[Tensor, "*batch p"]) -> Float[Tensor, "*batch d"]:
        _check_width(self, x, self.in_dim)
        return self.fc2(self.act(self.fc1(x)))
