"""FiLM language conditioning of vision blocks (OpenVLA-OFT).

In every block, between the attention residual and the MLP branch::

    x = x + ls1(attn(norm1(x)))
    x = x * (1 + gamma) + beta          # gamma, beta = Linear(cond_dim, dim)(condition)
    x = x + ls2(mlp(norm2(x)))

``condition [b, k]`` is the mean of the prompt's language embeddings, computed by the
caller. Applied to all tokens of the block (prefix tokens included), as in the reference.
An encoder without FiLM runs exactly its usual code path.
"""

from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.core.recording import recorded

__all__ = ["FiLM", "FiLMTimmBlock", "add_film"]


@recorded
class FiLM(nn.Module):
    """``x * (1 + scale(c)) + shift(c)``, broadcast over tokens.

    Parameter names (``scale``, ``shift``) follow OpenVLA-OFT.

    Args:
        cond_dim: width ``k`` of the conditioning vector (the LLM width, 4096 in OFT).
        dim: width ``d`` of the modulated tokens.
        zero_init: zero the projections, so the layer starts as the identity. OFT uses the
            default ``nn.Linear`` initialisation (``False``). Kept by ``reset_parameters``.
        linear: factory for ``scale`` and ``shift`` (both with bias); with ``zero_init`` the
            modules it returns need ``weight`` and ``bias`` parameters.
    """

    def __init__(
        self, cond_dim: int, dim: int, zero_init: bool = False, linear: LinearFactory = nn.Linear
    ) -> None:
        super().__init__()
        self.cond_dim = cond_dim
        self.dim = dim
        self.zero_init = zero_init
        self.scale = linear(cond_dim, dim, bias=True)
        self.shift = linear(cond_dim, dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """With ``zero_init``, zero both projections (the identity); otherwise nothing: the
        projections reset themselves (runs after them in
        [`init_parameters`][vlakit.core.init_parameters], which visits children first)."""
        if not self.zero_init:
            return
        for name in ("scale", "shift"):
            layer = getattr(self, name)
            for attr in ("weight", "bias"):
                param = getattr(layer, attr, None)
                if not isinstance(param, Tensor):
                    raise TypeError(
                        f"FiLM(zero_init=True) zeroes {name}.{attr}, but the {name} module "
                        f"({type(layer).__name__}) has no {attr} tensor"
                    )
                nn.init.zeros_(param)

    def forward(
        self, x: Float[Tensor, "b n d"], condition: Float[Tensor, "b k"]
    ) -> Float[Tensor, "b n d"]:
        if condition.shape[-1] != self.cond_dim:
            raise ValueError(
                f"FiLM expects a condition of width {self.cond_dim} (its cond_dim), got a "
                f"condition of shape {tuple(condition.shape)}"
            )
        gamma = self.scale(condition)[:, None, :]  # [b, 1, d]
        beta = self.shift(condition)[:, None, :]
        return x * (1 + gamma) + beta

    def extra_repr(self) -> str:
        return f"cond_dim={self.cond_dim}, dim={self.dim}"


class FiLMTimmBlock(nn.Module):
    """A timm ``Block`` with FiLM between its attention and MLP branches.

    Holds the timm block's own submodules under the same names, so the state-dict keys of
    the wrapped model stay ``blocks.{i}.norm1.*`` etc. (plus ``blocks.{i}.film.*``).

    Args:
        block: a ``timm.models.vision_transformer.Block`` (pre-LN, optional LayerScale).
        film: the FiLM layer.
    """

    def __init__(self, block: nn.Module, film: FiLM) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        if type(block) is not Block:
            raise TypeError(
                "FiLM supports timm's plain pre-LN timm.models.vision_transformer.Block only, "
                f"got a {type(block).__name__}"
            )
        self.norm1, self.attn, self.ls1 = block.norm1, block.attn, block.ls1
        self.drop_path1 = block.drop_path1
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2
        self.drop_path2 = block.drop_path2
        self.film = film

    def forward(
        self, x: Float[Tensor, "b n d"], condition: Float[Tensor, "b k"]
    ) -> Float[Tensor, "b n d"]:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = self.film(x, condition)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def add_film(
    encoder: nn.Module, cond_dim: int, zero_init: bool = False, linear: LinearFactory = nn.Linear
) -> nn.Module:
    """Attach a FiLM layer to every block of ``encoder`` (in place; returns it).

    Supported: the own [`ViT`][vlakit.vision.ViT], [`TimmEncoder`][vlakit.vision.TimmEncoder]
    (timm ``VisionTransformer`` with plain ``Block`` s),
    [`FusedEncoder`][vlakit.vision.FusedEncoder] (each member) and
    [`OpenClipEncoder`][vlakit.vision.OpenClipEncoder] with a timm trunk. Afterwards
    ``encoder.has_film`` is true and ``encoder(pixels, condition)`` requires
    ``condition [b, cond_dim]``.

    Args:
        encoder: the vision encoder.
        cond_dim: conditioning width (the LLM width).
        zero_init: start every FiLM layer as the identity.
        linear: factory for the FiLM projections (default ``nn.Linear``).
    """
    if not hasattr(encoder, "add_film"):
        raise TypeError(f"add_film expects a vlakit vision encoder, got a {type(encoder).__name__}")
    return encoder.add_film(cond_dim, zero_init=zero_init, linear=linear)
