"""Multi-head attention with RoPE and any query/key-value head ratio (MHA, GQA, MQA)."""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.core.recording import recorded
from vlakit.core.tap import AttentionTap
from vlakit.decoders.cache import KVCache
from vlakit.decoders.rope import apply_rotary

__all__ = ["Attention"]


@recorded
class Attention(nn.Module):
    """Self-attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        dim: model width ``d``.
        num_heads: query heads ``h``.
        num_kv_heads: key/value heads ``h_kv``; must divide ``num_heads`` (``h_kv == h``: MHA,
            ``1``: MQA, otherwise GQA).
        head_dim: per-head width ``hd`` (need not equal ``d / h``; Gemma-2B uses 256).
        qkv_bias: bias on the q/k/v projections (Qwen2 style).
        out_bias: bias on the output projection.
        scale: softmax scale; ``None`` means ``1 / sqrt(head_dim)``.
        linear: builds ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, called as
            ``linear(in_features, out_features, bias=...)`` (default ``nn.Linear``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
        scale: float | None = None,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.q_proj = linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = linear(num_heads * head_dim, dim, bias=out_bias)

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
        """Attend.

        Args:
            x: ``[b, q, d]`` normalised inputs.
            cos: ``[b, q, hd]`` RoPE cosines. sin: likewise sines.
            mask: ``[b, q, k]`` boolean (``True`` = may attend), or ``None`` for plain causal
                attention over ``q == k`` tokens (SDPA's ``is_causal`` fast path).
            cache: optional [KVCache][vlakit.decoders.KVCache].
            layer_idx: this layer's slot in ``cache``; required with a cache.
            tap: fill ``tap.weights`` with this layer's attention probabilities at the
                tap's queries (see [AttentionTap][vlakit.core.AttentionTap]); the output
                is computed by SDPA as without it.
        """
        q = rearrange(self.q_proj(x), "b n (h hd) -> b h n hd", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b n (h hd) -> b h n hd", h=self.num_kv_heads)
        v = rearrange(self.v_proj(x), "b n (h hd) -> b h n hd", h=self.num_kv_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            if layer_idx is None:
                raise ValueError("Attention got a cache but no layer_idx: pass the layer's index")
            k, v = cache.update(layer_idx, k, v)  # [b, h_kv, keys, hd]
        if tap is not None:
            tap.weights = _tapped_weights(q, k, mask, tap.queries, self.scale)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask[:, None],  # [b, 1, q, k]: all heads
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(rearrange(out, "b h n hd -> b n (h hd)"))


def _tapped_weights(
    q: Float[Tensor, "b h n hd"],
    k: Float[Tensor, "b hkv k hd"],
    mask: Bool[Tensor, "b n k"] | None,
    queries: Int[Tensor, "b t"],
    scale: float | None = None,
) -> Float[Tensor, "b h t k"]:
    """Attention probabilities (float32) of the query tokens ``queries`` over all keys: the
    rows SDPA would compute for them, for every query head (kv heads shared as in GQA).
    ``mask`` ``None`` is plain causal attention over ``n == k`` tokens."""
    b, h, _, hd = q.shape
    keys = k.shape[-2]
    index = queries[:, None, :, None].expand(b, h, -1, hd)
    picked = torch.gather(q, 2, index).float()  # [b, h, t, hd]
    groups = h // k.shape[1]
    kk = k.float() if groups == 1 else k.float().repeat_interleave(groups, dim=1)
    scores = picked @ kk.transpose(-1, -2) * (hd**-0.5 if scale is None else scale)
    if mask is None:
        allowed = torch.arange(keys, device=q.device) <= queries[..., None]  # [b, t, k]
    else:
        allowed = torch.gather(mask, 1, queries[..., None].expand(-1, -1, keys))  # [b, t, k]
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
