"""What an action expert needs of the stacks around it (pi0, pi0.5).

An action expert is a second [`LayerStack`][vlakit.decoders.LayerStack] whose layer ``i``
attends to the keys and values the main decoder's layer ``i`` cached for the prefix, plus
its own. Three small pieces make that exact and lean:

- [`check_expert`][vlakit.decoders.check_expert]: an expert can read a decoder's cache only
  with the same depth, the same key/value heads and head width in every layer, and the
  same rotary embedding; anything else is an error naming both sides.
- [`KeyValueLayer`][vlakit.decoders.KeyValueLayer]: a decoder layer of which only the keys
  and values are read. In pi0 the main decoder's last layer feeds nothing but the expert:
  its queries, output projection, MLP and the final norm after it are never read, so it
  is built as its input norm and key/value projections alone.
- [`FinalAdaptiveRMSNorm`][vlakit.decoders.FinalAdaptiveRMSNorm]: pi0.5's final expert norm
  without the gate rows a final norm never reads.
"""

from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.core.recording import recorded
from vlakit.core.tap import AttentionTap
from vlakit.decoders.cache import KVCache
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.norms import ConditionedNorm, _rms_modulated, _zero_dense
from vlakit.decoders.rope import apply_rotary

__all__ = [
    "KeyValueProjection",
    "KeyValueLayer",
    "FinalAdaptiveRMSNorm",
    "attention_geometry",
    "check_expert",
]


@recorded
class KeyValueProjection(nn.Module):
    """The key and value projections of an attention block, with RoPE on the keys: an
    [`Attention`][vlakit.decoders.Attention] without queries and output projection.

    Its parameters are named as ``Attention``'s (``k_proj``, ``v_proj``), so the keys and
    values of a full attention block's checkpoint load into it as they are.

    Args:
        dim: model width ``d``.
        num_kv_heads: key/value heads.
        head_dim: per-head width.
        bias: bias on both projections.
        linear: builds ``k_proj`` and ``v_proj``, called as
            ``linear(in_features, out_features, bias=...)``.
    """

    def __init__(
        self,
        dim: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool = False,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.k_proj = linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = linear(dim, num_kv_heads * head_dim, bias=bias)

    def forward(
        self,
        x: Float[Tensor, "b q d"],
        cos: Float[Tensor, "b q hd"],
        sin: Float[Tensor, "b q hd"],
    ) -> tuple[Float[Tensor, "b h q hd"], Float[Tensor, "b h q hd"]]:
        """Rotated keys and values ``[b, h_kv, q, hd]`` of the normalised inputs ``x``."""
        k = rearrange(self.k_proj(x), "b n (h hd) -> b h n hd", h=self.num_kv_heads)
        v = rearrange(self.v_proj(x), "b n (h hd) -> b h n hd", h=self.num_kv_heads)
        return apply_rotary(k, cos, sin), v


@recorded
class KeyValueLayer(DecoderLayer):
    """A decoder layer of which only the keys and values are read: it writes them into the
    KV cache and returns its input unchanged.

    pi0's PaliGemma runs the prefix once; the action expert reads every layer's cached keys
    and values, and nothing reads the last layer's output. That layer is this block: its
    input norm and key/value projections (1,050,624 parameters in Gemma-2B, against
    110,104,576 for a whole layer), and the stack after it needs no final norm
    (``nn.Identity``). The hidden states a stack ending in it returns are the previous
    layer's output, not a language model's (its LM logits mean nothing).

    State-dict names are a full layer's (``attn_norm.*``, ``attn.k_proj.*``,
    ``attn.v_proj.*``), so a whole layer's checkpoint loads once its queries, output
    projection, MLP and post-attention norm are skipped. It is a ``DecoderLayer`` (the same
    call, the unit stacks hold and FSDP2 shards) that has no MLP and no second norm.

    Args:
        attn: the key/value projections
            ([`KeyValueProjection`][vlakit.decoders.KeyValueProjection]).
        attn_norm: the norm before them (plain, or a
            [`ConditionedNorm`][vlakit.decoders.ConditionedNorm], whose gate is not used).
    """

    def __init__(self, attn: KeyValueProjection, attn_norm: nn.Module) -> None:
        nn.Module.__init__(self)  # not DecoderLayer's: there is no MLP and no MLP norm
        self.attn_norm = attn_norm
        self.attn = attn

    @property
    def condition_dim(self) -> int | None:
        """Width of the condition its norm reads (``None``: none)."""
        return self.attn_norm.cond_dim if isinstance(self.attn_norm, ConditionedNorm) else None

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
        """Write this layer's keys and values into ``cache`` (at ``layer_idx``) and return
        ``x`` unchanged (a copy). Without a cache nothing is computed (nothing would read
        it)."""
        if tap is not None:
            raise ValueError(
                f"an attention tap asks for layer {tap.layer}, but that layer is a "
                f"KeyValueLayer: it computes keys and values only, no attention weights; tap "
                f"an earlier layer"
            )
        if cache is None:
            return x
        if layer_idx is None:
            raise ValueError("KeyValueLayer got a cache but no layer_idx: pass the layer's index")
        if isinstance(self.attn_norm, ConditionedNorm):
            h, _ = self.attn_norm(x, condition)
        else:
            h = self.attn_norm(x)
        k, v = self.attn(h, cos, sin)
        cache.update(layer_idx, k, v)
        # a new tensor, not x itself: FSDP2 hooks a unit's output for the backward
        # all-gather, and an output that is a view of the input would lose that hook
        return x.clone()


@recorded
class FinalAdaptiveRMSNorm(ConditionedNorm):
    """pi0.5's final expert norm: [`AdaptiveRMSNorm`][vlakit.decoders.AdaptiveRMSNorm]
    without the gate rows, which a final norm never reads.

    ``scale, shift = dense(condition).chunk(2)``, ``y = rms_normed(x) * (1 + scale) +
    shift`` in fp32, cast back to ``x``'s dtype (the condition cast to ``x``'s dtype before
    ``dense``, eps 1e-6): ``AdaptiveRMSNorm``'s numbers exactly. ``dense`` is
    ``Linear(c, 2d)`` with bias, zero-initialised; a checkpoint's ``Linear(c, 3d)`` loads as
    its rows (and bias entries) ``[:2d]``, the gate rows ``[2d:]`` skipped (1,049,600
    parameters at pi0.5's width 1024). The gate returned is ``None``: a layer would add its
    residual ungated, so use it as a stack's final norm.

    Args:
        dim: width ``d`` of the normalised axis.
        cond_dim: width ``c`` of the condition.
        eps: added to the mean square before the square root.
        linear: builds ``dense`` as ``linear(cond_dim, 2 * dim, bias=True)``.
    """

    def __init__(
        self, dim: int, cond_dim: int, eps: float = 1e-6, linear: LinearFactory = nn.Linear
    ) -> None:
        super().__init__()
        self.dim = dim
        self.cond_dim = cond_dim
        self.eps = eps
        self.dense = linear(cond_dim, 2 * dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _zero_dense(self.dense)

    def forward(
        self, x: Float[Tensor, "b q d"], condition: Float[Tensor, "b c"] | Float[Tensor, "b q c"]
    ) -> tuple[Float[Tensor, "b q d"], None]:
        """``(y, None)``: the modulated norm of ``x``; no gate."""
        condition = self._check_condition(x, condition)
        scale, shift = self._modulation(self.dense(condition), x, parts=2)
        return _rms_modulated(x, scale, shift, self.eps), None

    def extra_repr(self) -> str:
        return f"{self.dim}, cond_dim={self.cond_dim}, eps={self.eps}"


def attention_geometry(stack: nn.Module) -> list[tuple[int, int, int | None]] | None:
    """``(key/value heads, head width, query heads)`` of every layer of a vlakit stack
    (query heads ``None`` for a [`KeyValueLayer`][vlakit.decoders.KeyValueLayer]), or
    ``None`` when the stack does not say (not a vlakit stack)."""
    layers = getattr(stack, "layers", None)
    if layers is None:
        return None
    geometry = []
    for layer in layers:
        attn = getattr(layer, "attn", None)
        kv, width = getattr(attn, "num_kv_heads", None), getattr(attn, "head_dim", None)
        if kv is None or width is None:
            return None
        geometry.append((kv, width, getattr(attn, "num_heads", None)))
    return geometry


def _heads(kv: int, width: int, queries: int | None) -> str:
    asked = "" if queries is None else f"{queries} query heads and "
    return f"{asked}{kv} key/value head{'s' if kv != 1 else ''} of width {width}"


def check_expert(decoder: nn.Module, expert: nn.Module) -> None:
    """Raise a ``ValueError`` naming both sides unless ``expert`` can run against the KV
    cache ``decoder`` fills: layer ``i`` of the expert attends to the keys and values of the
    decoder's layer ``i``, so both need the same depth, in every layer the same key/value
    heads and head width, and the same rotary embedding (head width and base). Query heads
    and model widths may differ (pi0: 8 query heads and 1 key/value head of 256 on both
    sides; widths 2048 and 1024)."""
    if expert is decoder:
        return
    depth, expert_depth = decoder.num_layers, expert.num_layers
    if depth != expert_depth:
        raise ValueError(
            f"the action expert has {expert_depth} layers but the decoder has {depth}: layer "
            f"i of an expert reads the keys and values of the decoder's layer i, so build the "
            f"expert with {depth} layers"
        )
    ours, theirs = attention_geometry(decoder), attention_geometry(expert)
    if ours is not None and theirs is not None:
        for i, (mine, its) in enumerate(zip(ours, theirs)):
            if mine[:2] != its[:2]:
                raise ValueError(
                    f"layer {i} of the action expert has {_heads(*its)}, but the decoder's "
                    f"layer {i} caches {_heads(*mine)}: an expert attends to the decoder's "
                    f"cached keys and values, so build it with num_kv_heads={mine[0]} and "
                    f"head_dim={mine[1]}"
                )
    rope, expert_rope = getattr(decoder, "rope", None), getattr(expert, "rope", None)
    if rope is not None and expert_rope is not None:
        mine = (getattr(rope, "head_dim", None), getattr(rope, "base", None))
        its = (getattr(expert_rope, "head_dim", None), getattr(expert_rope, "base", None))
        if mine != its:
            raise ValueError(
                f"the action expert's rotary embedding (head_dim={its[0]}, base={its[1]}) "
                f"differs from the decoder's (head_dim={mine[0]}, base={mine[1]}): the "
                f"prefix keys were rotated by the decoder's, so the expert's queries must be "
                f"too; build the expert with rope_base={mine[1]}"
            )
