"""vlakit's own Vision Transformer (SigLIP and DINOv2 families).

Pre-LN blocks, conv patch embedding, learned absolute position embedding (covering the
prefix tokens or not), optional CLS and register tokens, optional LayerScale, exact or tanh
GELU, optional final norm and optional MAP (attention-pool) head. Parameter names equal
timm's ``VisionTransformer`` (``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ``ls1.gamma``,
``attn_pool.*``), so timm checkpoints load after the identity rename in
[`vlakit.convert`][vlakit.convert] (which also reads timm / transformers
architectures; this module knows nothing of conversion).

Leaf blocks receive their linear layers: every projection is built by a ``linear`` factory
([`LinearFactory`][vlakit.core.LinearFactory], default ``nn.Linear``) and stored under
timm's name (``qkv``, ``proj``, ``fc1``, ``fc2``, ``q``, ``kv``), so LoRA / quantised
linears are a builder argument and PEFT-style name targeting works. Every module that owns
parameters directly defines ``reset_parameters`` (timm's initialisation), so a tower built
on the ``meta`` device is initialised by [`init_parameters`][vlakit.core.init_parameters]
after ``to_empty``.

The ViT returns the output of one chosen block (``output_layer``; OpenVLA takes ``-2``)
and runs no block after it. The final norm is applied only when that block is the last
one. [`ViT.truncate`][vlakit.vision.ViT.truncate] drops the parameters that are then never used.
"""

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.core.recording import record_call, recorded
from vlakit.vision.base import (
    VisionEncoder,
    as_hw,
    check_condition,
    check_image_size,
    layer_index,
)
from vlakit.vision.film import FiLM
from vlakit.vision.preprocess import PreprocessConfig

__all__ = ["ViT", "ViTBlock", "ViTAttention", "ViTMLP", "LayerScale", "PatchEmbed", "MAPHead"]

GeluApproximate = Literal["none", "tanh", "quick"]
"""``"none"``: exact GELU; ``"tanh"``: the tanh approximation (SigLIP); ``"quick"``:
``x * sigmoid(1.702 x)`` (OpenAI CLIP's QuickGELU)."""


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: OpenAI CLIP's activation (timm's ``quick_gelu``)."""

    def forward(self, x: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
        return x * torch.sigmoid(1.702 * x)


def _gelu(approximate: str) -> nn.Module:
    return QuickGELU() if approximate == "quick" else nn.GELU(approximate=approximate)


def _check_heads(owner: str, dim: int, num_heads: int) -> None:
    if num_heads <= 0 or dim % num_heads:
        raise ValueError(
            f"{owner}: the width must split evenly into heads, but dim={dim} is not divisible "
            f"by num_heads={num_heads}"
        )


@recorded
class PatchEmbed(nn.Module):
    """Non-overlapping ``patch × patch`` convolution: ``[b, c, H, W] -> [b, H/p, W/p, d]``."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixels: Float[Tensor, "b c h w"]) -> Float[Tensor, "b gh gw d"]:
        return rearrange(self.proj(pixels), "b d gh gw -> b gh gw d")


@recorded
class ViTAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout).

    Args:
        dim: token width.
        num_heads: attention heads (must divide ``dim``).
        qkv_bias: bias on the ``qkv`` projection (``proj`` always has one).
        linear: factory for ``qkv`` and ``proj``, called as ``linear(in, out, bias=...)``.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, linear: LinearFactory = nn.Linear
    ) -> None:
        super().__init__()
        _check_heads("ViTAttention", dim, num_heads)
        self.num_heads = num_heads
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = linear(dim, dim, bias=True)

    def forward(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b n d"]:
        q, k, v = rearrange(
            self.qkv(x), "b n (three h hd) -> three b h n hd", three=3, h=self.num_heads
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n hd -> b n (h hd)"))


@recorded
class ViTMLP(nn.Module):
    """``fc2(gelu(fc1(x)))``.

    Args:
        dim: token width.
        mlp_dim: hidden width.
        gelu_approximate: ``"none"`` (exact GELU) or ``"tanh"``.
        linear: factory for ``fc1`` and ``fc2`` (both with bias).
    """

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        gelu_approximate: GeluApproximate = "none",
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        self.fc1 = linear(dim, mlp_dim, bias=True)
        self.act = _gelu(gelu_approximate)
        self.fc2 = linear(mlp_dim, dim, bias=True)

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        return self.fc2(self.act(self.fc1(x)))


@recorded
class LayerScale(nn.Module):
    """Per-channel scale ``x · gamma`` (CaiT/DINOv2); timm's parameter name ``gamma``."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.init_value = float(init_value)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_value))

    def reset_parameters(self) -> None:
        """Every entry back to ``init_value``."""
        with torch.no_grad():
            self.gamma.fill_(self.init_value)

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        return x * self.gamma


@recorded
class ViTBlock(nn.Module):
    """Pre-LN transformer block, optionally with LayerScale and FiLM::

        x = x + ls1(attn(norm1(x)))
        x = film(x, condition)            # only when a FiLM layer is attached
        x = x + ls2(mlp(norm2(x)))

    Args:
        dim: token width ``d``.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        qkv_bias: bias on the fused qkv projection.
        layer_scale_init: LayerScale initial value; ``None`` for no LayerScale.
        gelu_approximate: ``"none"`` (exact GELU, timm's default) or ``"tanh"`` (SigLIP as
            trained, HF/big_vision).
        norm_eps: LayerNorm epsilon.
        linear: factory for the attention and MLP projections (default ``nn.Linear``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        layer_scale_init: float | None = None,
        gelu_approximate: GeluApproximate = "none",
        norm_eps: float = 1e-6,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ViTAttention(dim, num_heads, qkv_bias=qkv_bias, linear=linear)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ViTMLP(dim, mlp_dim, gelu_approximate, linear=linear)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.register_module("film", None)

    def forward(
        self, x: Float[Tensor, "b n d"], condition: Float[Tensor, "b k"] | None = None
    ) -> Float[Tensor, "b n d"]:
        x = x + self.ls1(self.attn(self.norm1(x)))
        if self.film is not None:
            x = self.film(x, condition)
        return x + self.ls2(self.mlp(self.norm2(x)))


@recorded
class MAPHead(nn.Module):
    """Multihead attention pooling: one learned latent query attends to all tokens, then a
    residual MLP (SigLIP's head; timm ``AttentionPoolLatent`` names and semantics).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        gelu_approximate: GELU flavour of the MLP.
        norm_eps: LayerNorm epsilon.
        linear: factory for ``q``, ``kv``, ``proj`` and the MLP (all with bias).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        gelu_approximate: GeluApproximate = "none",
        norm_eps: float = 1e-6,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        _check_heads("MAPHead", dim, num_heads)
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.reset_parameters()
        self.q = linear(dim, dim, bias=True)
        self.kv = linear(dim, 2 * dim, bias=True)
        self.proj = linear(dim, dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ViTMLP(dim, mlp_dim, gelu_approximate, linear=linear)

    def reset_parameters(self) -> None:
        """The latent query: normal with std ``dim ** -0.5`` as timm's
        ``AttentionPoolLatent``, truncated at ±2 (absolute, ``nn.init.trunc_normal_``'s
        default; timm truncates at ±2 std, a negligible difference kept so that random
        builds reproduce earlier vlakit numbers). The projections and the norm reset
        themselves."""
        nn.init.trunc_normal_(self.latent, std=self.latent.shape[-1] ** -0.5)

    def forward(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b d"]:
        q = rearrange(self.q(self.latent), "1 l (h hd) -> 1 h l hd", h=self.num_heads)
        k, v = rearrange(self.kv(x), "b n (two h hd) -> two b h n hd", two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q.expand(x.shape[0], -1, -1, -1), k, v)
        pooled = self.proj(rearrange(out, "b h 1 hd -> b (h hd)"))
        return pooled + self.mlp(self.norm(pooled))


@recorded
class ViT(VisionEncoder):
    """Vision Transformer encoder: pixels ``[b, c, H, W]`` → patch tokens ``[b, p, d]``.

    Use the builders ([`vit`][vlakit.vision], [`siglip_so400m`][vlakit.vision.siglip_so400m],
    [`dinov2_large_reg4`][vlakit.vision.dinov2_large_reg4]), or copy a timm / transformers
    model with [`vit_from_timm`][vlakit.convert.vit_from_timm] /
    [`vit_from_transformers`][vlakit.convert.vit_from_transformers]; the constructor
    receives the blocks.

    Args:
        blocks: the transformer blocks (all of width ``d``).
        img_size: image size the position embedding is built for.
        patch_size: square patch size ``p``.
        in_chans: input channels.
        class_token: prepend a CLS token.
        reg_tokens: number of register tokens (after the CLS token).
        pos_embed_prefix: the position embedding also covers the prefix (CLS/register)
            tokens (classic ViT); ``False`` = patches only (DINOv2 reg4, SigLIP).
        norm: final norm, applied only to the output of the last block; ``None`` = none.
        attn_pool: MAP pooling head used by [`pool`][vlakit.vision.ViT.pool]; ``None`` = none.
        output_layer: block whose output [`forward`][vlakit.vision.ViT.forward] returns
            (``-1`` last, ``-2`` second-to-last, or an index from 0); the blocks after it
            are not run.
        dynamic_img_size: accept other image sizes (multiples of ``p``) by resampling the
            position embedding (bicubic, timm's ``resample_abs_pos_embed``).
        preprocessing: size/mean/std/interpolation; default ``img_size``, mean = std = 0.5.
        norm_pre: a norm after the embeddings, before the first block (CLIP's ``ln_pre``,
            timm's ``pre_norm=True``); ``None`` = none.
        patch_bias: a bias on the patch convolution (CLIP has none).
    """

    def __init__(
        self,
        blocks: Sequence[ViTBlock],
        *,
        img_size: int | Sequence[int],
        patch_size: int,
        in_chans: int = 3,
        class_token: bool = False,
        reg_tokens: int = 0,
        pos_embed_prefix: bool = False,
        norm: nn.Module | None = None,
        attn_pool: MAPHead | None = None,
        output_layer: int = -1,
        dynamic_img_size: bool = False,
        preprocessing: PreprocessConfig | None = None,
        norm_pre: nn.Module | None = None,
        patch_bias: bool = True,
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("a ViT needs at least one block, got an empty list of blocks")
        dim = blocks[0].dim
        widths = sorted({block.dim for block in blocks})
        if len(widths) > 1:
            raise ValueError(f"all ViT blocks must have the same width, got widths {widths}")
        self.dim = dim
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.img_size = as_hw(img_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of the patch size {patch_size} "
                "on both sides"
            )
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_prefix = pos_embed_prefix
        self.num_reg_tokens = reg_tokens
        self.preprocessing = preprocessing or PreprocessConfig(
            size=self.img_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        )
        if self.preprocessing.out_channels != in_chans:
            raise ValueError(
                f"the preprocessing produces {self.preprocessing.out_channels} channels "
                f"(len(mean)), but the ViT takes in_chans={in_chans}"
            )

        self.patch_embed = PatchEmbed(patch_size, in_chans, dim, bias=patch_bias)
        self.norm_pre = norm_pre if norm_pre is not None else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, dim)) if reg_tokens else None
        num_pos = self.grid_size[0] * self.grid_size[1]
        num_pos += self.num_prefix_tokens if pos_embed_prefix else 0
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, dim))
        self.reset_parameters()

        self.blocks = nn.ModuleList(blocks)
        self.depth = len(blocks)
        self.norm = norm if norm is not None else nn.Identity()
        self.attn_pool = attn_pool
        self._dropped: list[str] = []
        self.output_layer = self._layer_index(output_layer)

    def reset_parameters(self) -> None:
        """The parameters the ViT owns directly, as timm's ``VisionTransformer.init_weights``:
        CLS and register tokens ``normal(std=1e-6)``, position embedding
        ``trunc_normal(std=0.02)``. Submodules (patch embedding, blocks, norms, head) reset
        themselves; [`init_parameters`][vlakit.core.init_parameters] visits them all."""
        with torch.no_grad():
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=1e-6)
            if self.reg_token is not None:
                nn.init.normal_(self.reg_token, std=1e-6)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ------------------------------------------------------------------ description
    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens in front of the patch tokens inside the blocks."""
        return (self.cls_token is not None) + self.num_reg_tokens

    @property
    def has_film(self) -> bool:
        return any(block.film is not None for block in self.blocks)

    @property
    def dropped_prefixes(self) -> list[str]:
        """State-dict key prefixes of the parts [`truncate`][vlakit.vision.ViT.truncate]
        removed (a full checkpoint still has them;
        [`load_checked`][vlakit.core.load_checked] skips them)."""
        return list(self._dropped)

    def grid(self, image_size: int | Sequence[int] | None = None) -> tuple[int, int]:
        """Patch grid ``(H/p, W/p)`` for ``image_size`` (default: the built size)."""
        h, w = as_hw(image_size) if image_size is not None else self.img_size
        return (h // self.patch_size, w // self.patch_size)

    def num_patches(self, image_size: int | Sequence[int] | None = None) -> int:
        gh, gw = self.grid(image_size if image_size is not None else self.preprocessing.size)
        return gh * gw

    def check_image_size(self, height: int, width: int) -> None:
        check_image_size(
            height,
            width,
            patch=(self.patch_size, self.patch_size),
            expected=self.img_size,
            dynamic=self.dynamic_img_size,
            hint="build the ViT with dynamic_img_size=True to interpolate the position embedding",
        )

    def _layer_index(self, layer: int) -> int:
        index = layer_index(layer, self.depth)
        if index >= len(self.blocks):
            raise ValueError(
                f"output_layer {layer} is block {index}, which truncate() removed; "
                f"blocks 0 to {len(self.blocks) - 1} remain"
            )
        return index

    def set_output_layer(self, layer: int) -> None:
        """Return the output of block ``layer`` from now on (negative counts from the end of
        the full depth)."""
        self.output_layer = self._layer_index(layer)

    # ------------------------------------------------------------------ modification
    def truncate(self) -> "ViT":
        """Drop every parameter the forward never uses: the blocks after ``output_layer``
        and, when that is not the last block, the final norm and the pooling head."""
        keep = self.output_layer + 1
        self._dropped += [f"blocks.{i}." for i in range(keep, len(self.blocks))]
        self.blocks = self.blocks[:keep]
        if self.output_layer != self.depth - 1:
            if not isinstance(self.norm, nn.Identity):
                self.norm = nn.Identity()
                self._dropped.append("norm.")
            if self.attn_pool is not None:
                self.attn_pool = None
                self._dropped.append("attn_pool.")
        record_call(self, "truncate")
        return self

    def add_film(
        self, cond_dim: int, zero_init: bool = False, linear: LinearFactory = nn.Linear
    ) -> "ViT":
        for block in self.blocks:
            block.film = FiLM(cond_dim, self.dim, zero_init=zero_init, linear=linear)
        record_call(self, "add_film", cond_dim=cond_dim, zero_init=zero_init, linear=linear)
        return self

    # ------------------------------------------------------------------ forward
    def embed(self, pixels: Float[Tensor, "b c h w"]) -> Float[Tensor, "b n d"]:
        """Patch embedding + position embedding + prefix tokens: ``[b, prefix + p, d]``."""
        grid = self.patch_embed(pixels)
        gh, gw = grid.shape[1], grid.shape[2]
        x = rearrange(grid, "b gh gw d -> b (gh gw) d")
        pos = self.pos_embed
        if (gh, gw) != self.grid_size:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(
                pos,
                new_size=(gh, gw),
                old_size=self.grid_size,
                num_prefix_tokens=self.num_prefix_tokens if self.pos_embed_prefix else 0,
            )
        prefix = [
            t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None
        ]
        if self.pos_embed_prefix:
            return self.norm_pre(torch.cat([*prefix, x], dim=1) + pos)
        x = x + pos
        return self.norm_pre(torch.cat([*prefix, x], dim=1) if prefix else x)

    def encode(
        self,
        pixels: Float[Tensor, "b c h w"],
        condition: Float[Tensor, "b k"] | None = None,
        layer: int | None = None,
    ) -> Float[Tensor, "b n d"]:
        """All tokens (prefix included) after block ``layer`` (default ``output_layer``).

        Runs blocks ``0..layer`` only; applies the final norm when ``layer`` is the last
        block.
        """
        index = self.output_layer if layer is None else self._layer_index(layer)
        check_condition("ViT", self.has_film, condition)
        x = self.embed(pixels)
        for block in itertools.islice(self.blocks, index + 1):  # later blocks never run
            x = block(x, condition)
        if index == self.depth - 1:
            x = self.norm(x)
        return x

    def forward_features(
        self, pixels: Float[Tensor, "b c h w"], condition: Float[Tensor, "b k"] | None = None
    ) -> Float[Tensor, "b p d"]:
        """Patch tokens of block ``output_layer`` (prefix tokens dropped)."""
        return self.encode(pixels, condition)[:, self.num_prefix_tokens :]

    def pool(self, tokens: Float[Tensor, "b p d"]) -> Float[Tensor, "b d"]:
        """MAP-pool patch tokens (from the last block, normed) into one vector per image."""
        if self.attn_pool is None:
            raise ValueError(
                "pool() needs a MAP pooling head, but this ViT has none (attn_pool is None); "
                "build it with map_head=True"
            )
        return self.attn_pool(tokens)
