"""One pre-norm decoder layer: the unit of sharding, checkpointing and compilation."""

from jaxtyping import Bool, Float
from torch import Tensor, nn

from vlakit.core.recording import recorded
from vlakit.core.tap import AttentionTap
from vlakit.decoders.attention import Attention
from vlakit.decoders.cache import KVCache
from vlakit.decoders.norms import ConditionedNorm

__all__ = ["DecoderLayer"]


@recorded
class DecoderLayer(nn.Module):
    """``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``.

    A norm that reads the per-call condition (a
    [`ConditionedNorm`][vlakit.decoders.ConditionedNorm]: pi0.5's
    [`AdaptiveRMSNorm`][vlakit.decoders.AdaptiveRMSNorm], DiT's
    [`AdaLayerNormZero`][vlakit.decoders.AdaLayerNormZero]) also gates its branch:
    ``y, gate = attn_norm(x, condition)``, ``x + gate * attn(y)`` (likewise the MLP).

    Args:
        attn: the self-attention block.
        mlp: the feed-forward block (e.g. [`GatedMLP`][vlakit.decoders.GatedMLP]).
        attn_norm: norm before attention (plain, or a ``ConditionedNorm``).
        mlp_norm: norm before the MLP (plain, or a ``ConditionedNorm``).
    """

    def __init__(
        self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module
    ) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    @property
    def condition_dim(self) -> int | None:
        """Width of the condition this layer's norms read (``None``: they read none)."""
        dims = {n.cond_dim for n in (self.attn_norm, self.mlp_norm)
                if isinstance(n, ConditionedNorm)}
        if len(dims) > 1:
            raise ValueError(
                f"the layer's two norms read conditions of different widths {sorted(dims)}; "
                f"one condition reaches both, so build them with the same cond_dim"
            )
        return dims.pop() if dims else None

    def forward(
        self,
        x: Float[Tensor, "b q d"],
        cos: Float[Tensor, "b q hd"],
        sin: Float[Tensor, "b q hd"],
        mask: Bool[Tensor, "b q k"] | None,
        cache: KVCache | None = None,
        layer_idx: int | None = None,
        tap: AttentionTap | None = None,
        condition: Float[Tensor, "b c"] | Float[Tensor, "b q c"] | None = None,
    ) -> Float[Tensor, "b q d"]:
        """``[b, q, d] -> [b, q, d]``; ``mask`` ``None`` is plain causal attention; with a
        ``cache``, ``layer_idx`` (this layer's cache slot) is required; ``tap`` reads this
        layer's attention weights (see [AttentionTap][vlakit.core.AttentionTap]);
        ``condition`` (``[b, c]``, or ``[b, q, c]`` per token) reaches the norms that read
        it and is required by them."""
        want = self.condition_dim
        if (condition is None) != (want is None):
            norms = f"{type(self.attn_norm).__name__}, {type(self.mlp_norm).__name__}"
            if condition is None:
                raise ValueError(
                    f"this layer's norms ({norms}) read a per-call condition of width {want}, "
                    f"but none was given: pass condition=[batch, {want}]"
                )
            raise ValueError(
                f"a condition {tuple(condition.shape)} was given, but this layer's norms "
                f"({norms}) read none"
            )
        h, gate = _norm(self.attn_norm, x, condition)
        if tap is None:  # the plain call: what compiled and sharded layers usually see
            h = self.attn(h, cos, sin, mask, cache, layer_idx)
        else:
            h = self.attn(h, cos, sin, mask, cache, layer_idx, tap)
        x = x + h if gate is None else x + gate * h
        h, gate = _norm(self.mlp_norm, x, condition)
        h = self.mlp(h)
        return x + h if gate is None else x + gate * h


def _norm(norm: nn.Module, x: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(norm(x), None)`` for a plain norm; ``norm(x, condition)`` (output and gate) for a
    conditioned one, which raises without a condition."""
    if isinstance(norm, ConditionedNorm):
        return norm(x, condition)
    return norm(x), None
