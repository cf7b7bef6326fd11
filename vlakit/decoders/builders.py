"""Decoder and stack builders: component builders taking every knob, and named sizes.

As in torchtune, a model is a function that calls constructors. ``transformer_decoder`` and
``transformer_stack`` take every architectural knob, ``llama``, ``gemma`` and
``gemma_stack`` fix a family's conventions, and ``llama2_7b``, ``gemma_2b`` and
``gemma_300m_stack`` call them with the published sizes. Build on the ``meta`` device to
count parameters without allocating::

    with torch.device("meta"):
        model = llama2_7b()
"""

import functools
from collections.abc import Callable

import torch
from torch import nn

from vlakit.core.init import building
from vlakit.core.linear import LinearFactory
from vlakit.decoders.attention import Attention
from vlakit.decoders.embedding import TokenEmbedding
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.mlp import GatedMLP
from vlakit.decoders.norms import RMSNorm
from vlakit.decoders.rope import RotaryEmbedding
from vlakit.decoders.stack import LayerStack
from vlakit.decoders.transformer import TransformerDecoder

__all__ = [
    "NormFactory",
    "transformer_decoder",
    "transformer_stack",
    "llama",
    "gemma",
    "gemma_stack",
    "llama2_7b",
    "gemma_2b",
    "gemma_300m_stack",
]

NormFactory = Callable[[int], nn.Module]
"""Called as ``norm(dim)`` for every norm of a stack (each layer's two and the final one);
returns a plain norm (``forward(x)``) or a [`ConditionedNorm`][vlakit.decoders.ConditionedNorm]
(``forward(x, condition)``): ``functools.partial(RMSNorm, eps=1e-6, unit_offset=True)``,
``functools.partial(AdaptiveRMSNorm, cond_dim=1024)`` (pi0.5),
``functools.partial(AdaLayerNormZero, cond_dim=c)`` (DiT)."""


def _layers(
    *,
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    mlp_dim: int,
    head_dim: int | None,
    activation: nn.Module,
    norm: NormFactory,
    qkv_bias: bool,
    attn_scale: float | None,
    linear: LinearFactory,
) -> tuple[list[DecoderLayer], int]:
    """The layers of a Llama/Gemma-style stack and their head width (inside ``building``)."""
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide the hidden size dim={dim}; "
                f"pass head_dim explicitly"
            )
        head_dim = dim // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    layers = [
        DecoderLayer(
            attn=Attention(
                dim, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias, scale=attn_scale,
                linear=linear,
            ),
            mlp=GatedMLP(dim, mlp_dim, activation, linear=linear),
            attn_norm=norm(dim),
            mlp_norm=norm(dim),
        )
        for _ in range(num_layers)
    ]
    return layers, head_dim


def transformer_stack(
    *,
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    mlp_dim: int,
    head_dim: int | None = None,
    activation: nn.Module,
    norm: NormFactory,
    rope_base: float = 10000.0,
    max_seq_len: int = 4096,
    qkv_bias: bool = False,
    attn_scale: float | None = None,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LayerStack:
    """Component builder of a bare [`LayerStack`][vlakit.decoders.LayerStack] (layers, final
    norm, RoPE; no embedding, no LM head), with every knob.

    Args:
        dim: model width ``d``.
        num_layers: number of decoder layers.
        num_heads: query heads; ``head_dim * num_heads`` need not equal ``dim``.
        num_kv_heads: key/value heads (divides ``num_heads``).
        mlp_dim: MLP inner width.
        head_dim: per-head width; default ``dim // num_heads`` (which must then divide).
        activation: MLP gate activation (``nn.SiLU()``: SwiGLU; tanh GELU: GeGLU).
        norm: builds every norm as ``norm(dim)`` (see
            [`NormFactory`][vlakit.decoders.NormFactory]); a conditioned norm makes the
            stack read ``condition=``.
        rope_base: RoPE theta.
        max_seq_len: positions must be below this.
        qkv_bias: bias on q/k/v projections.
        attn_scale: softmax scale, default ``1/sqrt(head_dim)``.
        linear: factory for the attention and MLP projections, called as
            ``linear(in_features, out_features, bias=...)``.
        dtype: parameter dtype, built directly (default: torch's default dtype).
        device: where to build (``"meta"`` to count parameters without memory).
    """
    with building(dtype, device):
        layers, head_dim = _layers(
            dim=dim, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
            mlp_dim=mlp_dim, head_dim=head_dim, activation=activation, norm=norm,
            qkv_bias=qkv_bias, attn_scale=attn_scale, linear=linear,
        )
        return LayerStack(
            dim, layers, norm(dim), RotaryEmbedding(head_dim, base=rope_base),
            max_seq_len=max_seq_len,
        )


def gemma_stack(
    *,
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mlp_dim: int,
    norm_eps: float = 1e-6,
    norm: NormFactory | None = None,
    rope_base: float = 10000.0,
    max_seq_len: int = 8192,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LayerStack:
    """A Gemma-family stack: GeGLU (tanh GELU) and ``(1 + w) * x`` RMSNorm, no embedding.

    The other arguments are as in [`transformer_stack`][vlakit.decoders.transformer_stack].

    Args:
        norm_eps: epsilon of the default Gemma RMSNorm.
        norm: replaces the Gemma RMSNorm everywhere, e.g.
            ``functools.partial(AdaptiveRMSNorm, cond_dim=1024)`` for pi0.5's expert
            (``norm_eps`` is then not used).
    """
    if norm is None:
        norm = functools.partial(RMSNorm, eps=norm_eps, unit_offset=True)
    return transformer_stack(
        dim=dim, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        mlp_dim=mlp_dim, head_dim=head_dim, activation=nn.GELU(approximate="tanh"), norm=norm,
        rope_base=rope_base, max_seq_len=max_seq_len, linear=linear, dtype=dtype,
        device=device,
    )


def gemma_300m_stack(
    *,
    norm_eps: float = 1e-6,
    norm: NormFactory | None = None,
    max_seq_len: int = 8192,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LayerStack:
    """pi0's action expert ("gemma_300m"): 18 layers, d=1024, 8 query heads / 1 kv head of
    256, GeGLU 4096, no embedding and no LM head.

    311,464,960 parameters (17,303,552 per layer); with pi0.5's adaptive norms,
    ``norm=functools.partial(AdaptiveRMSNorm, cond_dim=1024)``, 427,932,672 (37 norms, each
    a ``Linear(1024, 3072)`` with bias instead of a scale vector). Its layer ``i`` attends
    to the keys and values of Gemma-2B's layer ``i`` (same layer count, kv heads and head
    width).

    Args:
        norm_eps: RMSNorm epsilon (Gemma's 1e-6).
        norm: replaces the Gemma RMSNorm (see [`gemma_stack`][vlakit.decoders.gemma_stack]).
        max_seq_len: positions must be below this.
        linear: factory for the attention and MLP projections.
        dtype: parameter dtype, built directly.
        device: where to build (``"meta"`` to count parameters without memory).
    """
    return gemma_stack(
        dim=1024, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=4096,
        norm_eps=norm_eps, norm=norm, max_seq_len=max_seq_len, linear=linear, dtype=dtype,
        device=device,
    )


def transformer_decoder(
    *,
    vocab_size: int,
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    mlp_dim: int,
    head_dim: int | None = None,
    activation: nn.Module,
    norm_eps: float,
    norm_unit_offset: bool,
    scale_by_sqrt_dim: bool,
    tie_embeddings: bool,
    rope_base: float = 10000.0,
    max_seq_len: int = 4096,
    qkv_bias: bool = False,
    attn_scale: float | None = None,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TransformerDecoder:
    """Component builder with every knob of a Llama/Gemma-style decoder.

    Args:
        vocab_size: vocabulary ``V``.
        dim: model width ``d``.
        num_layers: number of decoder layers.
        num_heads: query heads; ``head_dim * num_heads`` need not equal ``dim``.
        num_kv_heads: key/value heads (divides ``num_heads``).
        mlp_dim: MLP inner width.
        head_dim: per-head width; default ``dim // num_heads`` (which must then divide).
        activation: MLP gate activation (``nn.SiLU()``: SwiGLU; tanh GELU: GeGLU).
        norm_eps: RMSNorm epsilon.
        norm_unit_offset: RMSNorm as ``(1 + w) * x`` (Gemma) instead of ``w * x``.
        scale_by_sqrt_dim: multiply token embeddings by ``sqrt(d)`` (Gemma).
        tie_embeddings: LM head shares the embedding matrix.
        rope_base: RoPE theta.
        max_seq_len: positions must be below this.
        qkv_bias: bias on q/k/v projections.
        attn_scale: softmax scale, default ``1/sqrt(head_dim)``.
        linear: factory for the attention and MLP projections, called as
            ``linear(in_features, out_features, bias=...)`` (LoRA, quantised, FP8 linears).
            The LM head stays a plain ``nn.Linear`` (or tied to the embedding).
        dtype: parameter dtype, built directly (default: torch's default dtype).
        device: where to build (``"meta"`` to count parameters without memory).
    """
    norm = functools.partial(RMSNorm, eps=norm_eps, unit_offset=norm_unit_offset)
    with building(dtype, device):
        layers, head_dim = _layers(
            dim=dim, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
            mlp_dim=mlp_dim, head_dim=head_dim, activation=activation, norm=norm,
            qkv_bias=qkv_bias, attn_scale=attn_scale, linear=linear,
        )
        return TransformerDecoder(
            embed=TokenEmbedding(vocab_size, dim, scale_by_sqrt_dim=scale_by_sqrt_dim),
            layers=layers,
            norm=norm(dim),
            rope=RotaryEmbedding(head_dim, base=rope_base),
            lm_head=None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False),
            max_seq_len=max_seq_len,
        )


def llama(
    *,
    vocab_size: int,
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    mlp_dim: int,
    head_dim: int | None = None,
    norm_eps: float = 1e-5,
    rope_base: float = 10000.0,
    max_seq_len: int = 4096,
    tie_embeddings: bool = False,
    qkv_bias: bool = False,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TransformerDecoder:
    """Llama-family decoder: SwiGLU, ``w * x`` RMSNorm, unscaled embeddings, untied head.

    Arguments as in [`transformer_decoder`][vlakit.decoders.transformer_decoder];
    ``num_kv_heads`` defaults to ``num_heads``.
    """
    return transformer_decoder(
        vocab_size=vocab_size,
        dim=dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads or num_heads,
        mlp_dim=mlp_dim,
        head_dim=head_dim,
        activation=nn.SiLU(),
        norm_eps=norm_eps,
        norm_unit_offset=False,
        scale_by_sqrt_dim=False,
        tie_embeddings=tie_embeddings,
        rope_base=rope_base,
        max_seq_len=max_seq_len,
        qkv_bias=qkv_bias,
        linear=linear,
        dtype=dtype,
        device=device,
    )


def gemma(
    *,
    vocab_size: int,
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mlp_dim: int,
    norm_eps: float = 1e-6,
    rope_base: float = 10000.0,
    max_seq_len: int = 8192,
    tie_embeddings: bool = True,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TransformerDecoder:
    """Gemma-family decoder: GeGLU (tanh GELU), ``(1 + w) * x`` RMSNorm, ``sqrt(d)``-scaled
    embeddings, tied head.

    Arguments as in [`transformer_decoder`][vlakit.decoders.transformer_decoder].
    """
    return transformer_decoder(
        vocab_size=vocab_size,
        dim=dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        mlp_dim=mlp_dim,
        head_dim=head_dim,
        activation=nn.GELU(approximate="tanh"),
        norm_eps=norm_eps,
        norm_unit_offset=True,
        scale_by_sqrt_dim=True,
        tie_embeddings=tie_embeddings,
        rope_base=rope_base,
        max_seq_len=max_seq_len,
        linear=linear,
        dtype=dtype,
        device=device,
    )


def llama2_7b(
    vocab_size: int = 32000,
    norm_eps: float = 1e-5,
    max_seq_len: int = 4096,
    *,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TransformerDecoder:
    """Llama-2-7B: 32 layers, d=4096, 32 heads (MHA), MLP 11008, untied head.

    6,738,415,616 parameters with ``vocab_size=32000``; OpenVLA uses ``vocab_size=32064``
    (6,738,939,904). Llama-2 was trained with ``norm_eps=1e-5``.

    Args:
        vocab_size: vocabulary ``V``.
        norm_eps: RMSNorm epsilon (default 1e-5, Llama-2's).
        max_seq_len: positions must be below this.
        linear: factory for the attention and MLP projections.
        dtype: parameter dtype, built directly (no fp32 copy first).
        device: where to build (``"meta"`` to count parameters without memory).
    """
    return llama(
        vocab_size=vocab_size,
        dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        mlp_dim=11008,
        norm_eps=norm_eps,
        max_seq_len=max_seq_len,
        linear=linear,
        dtype=dtype,
        device=device,
    )


def gemma_2b(
    vocab_size: int = 256000,
    norm_eps: float = 1e-6,
    max_seq_len: int = 8192,
    *,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TransformerDecoder:
    """Gemma-2B: 18 layers, d=2048, 8 query heads / 1 kv head of 256, GeGLU 16384, tied.

    2,506,172,416 parameters with ``vocab_size=256000``; PaliGemma's LM uses 257216
    (2,508,662,784).

    Args:
        vocab_size: vocabulary ``V``.
        norm_eps: RMSNorm epsilon (default 1e-6, Gemma's).
        max_seq_len: positions must be below this.
        linear: factory for the attention and MLP projections.
        dtype: parameter dtype, built directly (no fp32 copy first).
        device: where to build (``"meta"`` to count parameters without memory).
    """
    return gemma(
        vocab_size=vocab_size,
        dim=2048,
        num_layers=18,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
        mlp_dim=16384,
        norm_eps=norm_eps,
        max_seq_len=max_seq_len,
        linear=linear,
        dtype=dtype,
        device=device,
    )

