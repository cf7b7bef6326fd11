"""One pre-norm decoder layer: the unit of sharding, checkpointing and compilation."""

from jaxtyping import Bool, Float
from torch import Tensor, nn

from vlakit.core.recording import recorded
from vlakit.core.tap import AttentionTap
from vlakit.decoders.attention import Attention
from vlakit.decoders.cache import KVCache

__all__ = ["DecoderLayer"]


@recorded
class DecoderLayer(nn.Module):
    """``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``.

    Args:
        attn: the self-attention block.
        mlp: the feed-forward block (e.g. [`GatedMLP`][vlakit.decoders.GatedMLP]).
        attn_norm: norm before attention.
        mlp_norm: norm before the MLP.
    """

    def __init__(
        self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module
    ) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def forward(
        self,
        x: Float[Tensor, "b q d"],
        cos: Float[Tensor, "b q hd"],
        sin: Float[Tensor, "b q hd"],
        mask: Bool[Tensor, "b q k"] | None,
        cache: KVCache | None = None,
        layer_idx: int | None = None,
        tap: AttentionTap | None = None,
    ) -> Float[Tensor, "b q d"]:
        """``[b, q, d] -> [b, q, d]``; ``mask`` ``None`` is plain causal attention; with a
        ``cache``, ``layer_idx`` (this layer's cache slot) is required; ``tap`` reads this
        layer's attention weights (see [AttentionTap][vlakit.core.AttentionTap])."""
        if tap is None:  # the plain call: what compiled and sharded layers usually see
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer_idx)
        else:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer_idx, tap)
        return x + self.mlp(self.mlp_norm(x))
