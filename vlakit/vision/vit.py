"""vlakit's own Vision Transformer (SigLIP and DINOv2 families).

Pre-LN blocks, conv patch embedding, learned absolute position embedding (covering the
prefix tokens or not), optional CLS and register tokens, optional LayerScale, exact or tanh
GELU, optional final norm and optional MAP (attention-pool) head. Parameter names equal
timm's ``VisionTransformer`` (``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ``ls1.gamma``,
``attn_pool.*``), so timm checkpoints load after the identity rename in
:mod:`vlakit.vision.weights`.

The ViT returns the output of one chosen block (``output_layer``; OpenVLA takes ``-2``)
and runs no block after it. The final norm is applied only when that block is the last
one. :meth:`ViT.truncate` drops the parameters that are then never used.
"""

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.vision.base import VisionEncoder, as_hw
from vlakit.vision.film import FiLM
from vlakit.vision.preprocess import PreprocessConfig

__all__ = ["ViT", "ViTBlock", "ViTAttention", "ViTMLP", "LayerScale", "PatchEmbed", "MAPHead"]

GeluApproximate = Literal["none", "tanh"]


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch × patch`` convolution: ``[b, c, H, W] -> [b, H/p, W/p, d]``."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixels: Float[Tensor, "b c h w"]) -> Float[Tensor, "b gh gw d"]:
        return rearrange(self.proj(pixels), "b d gh gw -> b gh gw d")


class ViTAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b n d"]:
        q, k, v = rearrange(
            self.qkv(x), "b n (three h hd) -> three b h n hd", three=3, h=self.num_heads
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n hd -> b n (h hd)"))


class ViTMLP(nn.Module):
    """``fc2(gelu(fc1(x)))``; ``gelu_approximate`` is ``"none"`` (exact) or ``"tanh"``."""

    def __init__(self, dim: int, hidden_dim: int, gelu_approximate: GeluApproximate = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``x · gamma`` (CaiT/DINOv2); timm's parameter name ``gamma``."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        return x * self.gamma


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
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ViTAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ViTMLP(dim, mlp_dim, gelu_approximate)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.register_module("film", None)

    def forward(
        self, x: Float[Tensor, "b n d"], condition: Float[Tensor, "b k"] | None = None
    ) -> Float[Tensor, "b n d"]:
        x = x + self.ls1(self.attn(self.norm1(x)))
        if self.film is not None:
            x = self.film(x, condition)
        return x + self.ls2(self.mlp(self.norm2(x)))


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned latent query attends to all tokens, then a
    residual MLP (SigLIP's head; timm ``AttentionPoolLatent`` names and semantics).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        gelu_approximate: GELU flavour of the MLP.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        gelu_approximate: GeluApproximate = "none",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ViTMLP(dim, mlp_dim, gelu_approximate)

    def forward(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b d"]:
        q = rearrange(self.q(self.latent), "1 l (h hd) -> 1 h l hd", h=self.num_heads)
        k, v = rearrange(self.kv(x), "b n (two h hd) -> two b h n hd", two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q.expand(x.shape[0], -1, -1, -1), k, v)
        pooled = self.proj(rearrange(out, "b h 1 hd -> b (h hd)"))
        return pooled + self.mlp(self.norm(pooled))


class ViT(VisionEncoder):
    """Vision Transformer encoder: pixels ``[b, c, H, W]`` → patch tokens ``[b, p, d]``.

    Use the builders (:func:`~vlakit.vision.vit`, :func:`~vlakit.vision.siglip_so400m`,
    :func:`~vlakit.vision.dinov2_large_reg4`) or :meth:`from_timm` /
    :meth:`from_transformers`; the constructor receives the blocks.

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
        attn_pool: MAP pooling head used by :meth:`pool`; ``None`` = none.
        output_layer: block whose output :meth:`forward` returns (``-1`` last, ``-2``
            second-to-last, or an index from 0); the blocks after it are not run.
        dynamic_img_size: accept other image sizes (multiples of ``p``) by resampling the
            position embedding (bicubic, timm's ``resample_abs_pos_embed``).
        preprocessing: size/mean/std/interpolation; default ``img_size``, mean = std = 0.5.
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
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("a ViT needs at least one block")
        dim = blocks[0].dim
        self.dim = dim
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.img_size = as_hw(img_size)
        for side in self.img_size:
            if side % patch_size:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch {patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_prefix = pos_embed_prefix
        self.num_reg_tokens = reg_tokens
        self.preprocessing = preprocessing or PreprocessConfig(
            size=self.img_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        )
        if self.preprocessing.out_channels != in_chans:
            raise ValueError(
                f"preprocessing produces {self.preprocessing.out_channels} channels, the ViT "
                f"takes in_chans={in_chans}"
            )

        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.normal_(self.cls_token, std=1e-6)
        else:
            self.register_parameter("cls_token", None)
        if reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, dim))
            nn.init.normal_(self.reg_token, std=1e-6)
        else:
            self.register_parameter("reg_token", None)
        num_pos = self.grid_size[0] * self.grid_size[1]
        num_pos += self.num_prefix_tokens if pos_embed_prefix else 0
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

        self.blocks = nn.ModuleList(blocks)
        self.depth = len(blocks)
        self.norm = norm if norm is not None else nn.Identity()
        self.attn_pool = attn_pool
        self._dropped: list[str] = []
        self.output_layer = self._layer_index(output_layer)

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
        """State-dict key prefixes of the parts :meth:`truncate` removed (a full checkpoint
        still has them; :func:`~vlakit.vision.weights.load_checked` skips them)."""
        return list(self._dropped)

    def grid(self, image_size: int | Sequence[int] | None = None) -> tuple[int, int]:
        """Patch grid ``(H/p, W/p)`` for ``image_size`` (default: the built size)."""
        h, w = as_hw(image_size) if image_size is not None else self.img_size
        return (h // self.patch_size, w // self.patch_size)

    def num_patches(self, image_size: int | Sequence[int] | None = None) -> int:
        gh, gw = self.grid(image_size if image_size is not None else self.preprocessing.size)
        return gh * gw

    def check_image_size(self, height: int, width: int) -> None:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size ({height}, {width}) is not divisible by the patch size {p}"
            )
        if not self.dynamic_img_size and (height, width) != self.img_size:
            raise ValueError(
                f"expected image size {self.img_size} (the position embedding's grid "
                f"{self.grid_size}), got ({height}, {width}); build the ViT with "
                "dynamic_img_size=True to interpolate the position embedding"
            )

    def _layer_index(self, layer: int) -> int:
        if not -self.depth <= layer < self.depth:
            raise ValueError(f"output_layer must be in [{-self.depth}, {self.depth}), got {layer}")
        index = layer % self.depth
        if index >= len(self.blocks):
            raise ValueError(
                f"block {index} was removed by truncate(); {len(self.blocks)} blocks remain"
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
        return self

    def add_film(self, cond_dim: int, zero_init: bool = False) -> "ViT":
        for block in self.blocks:
            block.film = FiLM(cond_dim, self.dim, zero_init=zero_init)
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
            return torch.cat([*prefix, x], dim=1) + pos
        x = x + pos
        return torch.cat([*prefix, x], dim=1) if prefix else x

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
        film = self.has_film
        if film and condition is None:
            raise ValueError("this ViT has FiLM layers: pass condition [b, cond_dim]")
        if not film and condition is not None:
            raise ValueError("condition given, but this ViT has no FiLM layers (add_film)")
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
            raise ValueError("this ViT has no pooling head (attn_pool is None)")
        return self.attn_pool(tokens)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_timm(cls, model: nn.Module, output_layer: int = -1) -> "ViT":
        """Copy a timm ``VisionTransformer`` (SigLIP / DINOv2 / plain ViT families).

        Supported: pre-LN ``Block`` s with optional LayerScale, fused qkv, exact or tanh
        GELU, CLS/register tokens, pos-embed with or without prefix, final norm, MAP head
        (``global_pool='map'``; other heads/``fc_norm``/classifier are not copied).
        Unsupported options (``pre_norm``, qk-norm, scale norms, other block types) raise.
        """
        from vlakit.vision.weights import load_checked, timm_to_vit

        spec = _timm_spec(model)
        param = next(model.parameters())
        vit = _build_uninitialised(spec, output_layer, param.device, param.dtype)
        load_checked(vit, timm_to_vit(model.state_dict(), has_attn_pool=vit.attn_pool is not None))
        return vit

    @classmethod
    def from_transformers(
        cls,
        model: nn.Module,
        output_layer: int = -1,
        preprocessing: PreprocessConfig | None = None,
    ) -> "ViT":
        """Copy a transformers ``SiglipVisionModel`` (or a ``SiglipModel``'s vision half).

        Preprocessing defaults to SigLIP's: the config's image size, mean = std = 0.5,
        bicubic.
        """
        from vlakit.vision.weights import load_checked, transformers_siglip_to_vit

        if hasattr(model, "vision_model"):
            model = model.vision_model
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "siglip_vision_model":
            raise TypeError(
                "from_transformers supports SiglipVisionModel, got "
                f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
            )
        act = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}.get(
            config.hidden_act
        )
        if act is None:
            raise ValueError(f"unsupported SigLIP hidden_act {config.hidden_act!r}")
        d, eps = config.hidden_size, config.layer_norm_eps
        size = as_hw(config.image_size)
        spec = dict(
            img_size=size,
            patch_size=int(config.patch_size),
            in_chans=config.num_channels,
            dim=d,
            depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            mlp_dim=config.intermediate_size,
            qkv_bias=True,
            layer_scale=False,
            gelu_approximate=act,
            norm_eps=eps,
            class_token=False,
            reg_tokens=0,
            pos_embed_prefix=False,
            final_norm=True,
            final_norm_eps=eps,
            map_head=bool(getattr(model, "use_head", config.vision_use_head)),
            dynamic_img_size=False,
            preprocessing=preprocessing
            or PreprocessConfig(size=size, mean=(0.5,) * 3, std=(0.5,) * 3),
        )
        param = next(model.parameters())
        vit = _build_uninitialised(spec, output_layer, param.device, param.dtype)
        load_checked(vit, transformers_siglip_to_vit(model.state_dict()))
        return vit


def _build_uninitialised(
    spec: dict, output_layer: int, device: torch.device, dtype: torch.dtype
) -> ViT:
    """Build on the meta device (no initialisation cost), then allocate on ``device``; every
    parameter is overwritten by the checkpoint that follows."""
    with torch.device("meta"):
        vit = _build_from_spec(spec, output_layer=output_layer)
    return vit.to_empty(device=device).to(dtype)


def _build_from_spec(spec: dict, output_layer: int) -> ViT:
    d = spec["dim"]
    blocks = [
        ViTBlock(
            d,
            spec["num_heads"],
            spec["mlp_dim"],
            qkv_bias=spec["qkv_bias"],
            layer_scale_init=1e-5 if spec["layer_scale"] else None,
            gelu_approximate=spec["gelu_approximate"],
            norm_eps=spec["norm_eps"],
        )
        for _ in range(spec["depth"])
    ]
    head = None
    if spec["map_head"]:
        head = MAPHead(
            d, spec["num_heads"], spec["mlp_dim"], spec["gelu_approximate"], spec["norm_eps"]
        )
    return ViT(
        blocks,
        img_size=spec["img_size"],
        patch_size=spec["patch_size"],
        in_chans=spec["in_chans"],
        class_token=spec["class_token"],
        reg_tokens=spec["reg_tokens"],
        pos_embed_prefix=spec["pos_embed_prefix"],
        norm=nn.LayerNorm(d, eps=spec["final_norm_eps"]) if spec["final_norm"] else None,
        attn_pool=head,
        output_layer=output_layer,
        dynamic_img_size=spec["dynamic_img_size"],
        preprocessing=spec["preprocessing"],
    )


def _gelu_kind(act: nn.Module) -> str:
    from timm.layers.activations import GELU as TimmGELU
    from timm.layers.activations import GELUTanh

    if isinstance(act, nn.GELU):
        return act.approximate
    if isinstance(act, GELUTanh):
        return "tanh"
    if isinstance(act, TimmGELU):
        return "none"
    raise ValueError(f"unsupported activation {type(act).__name__}; expected GELU (exact or tanh)")


def _timm_spec(model: nn.Module) -> dict:
    """Read the architecture of a timm VisionTransformer, refusing what ViT cannot express."""
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    pe = model.patch_embed
    ph, pw = pe.patch_size
    if ph != pw:
        raise ValueError(f"only square patches are supported, got {pe.patch_size}")
    if not isinstance(model.norm_pre, nn.Identity):
        raise ValueError("unsupported timm option pre_norm=True (CLIP-style norm_pre)")
    if pe.proj.bias is None or not isinstance(pe.norm, nn.Identity):
        raise ValueError("unsupported patch embedding (needs a bias and no norm)")
    if model.pos_embed is None:
        raise ValueError("unsupported timm option pos_embed='none'")
    first = model.blocks[0]
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ValueError(f"block {i} is {type(block).__name__}; only timm Block is supported")
        if not all(
            isinstance(m, nn.Identity)
            for m in (block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.mlp.norm)
        ):
            raise ValueError(f"block {i} uses qk-norm or scale norms, which ViT does not support")
        if (block.attn.proj.bias is None) or (block.mlp.fc1.bias is None):
            raise ValueError(f"block {i} has no projection bias (proj_bias=False unsupported)")
    norm_eps = first.norm1.eps
    act = _gelu_kind(first.mlp.act)
    head = model.attn_pool
    map_head = head is not None
    if map_head:
        if not isinstance(head, AttentionPoolLatent) or head.latent_len != 1 or head.mlp is None:
            raise ValueError(f"unsupported pooling head {type(head).__name__}")
        if head.pos_embed is not None or not isinstance(head.q_norm, nn.Identity):
            raise ValueError("unsupported AttentionPoolLatent options (pos_embed or qk_norm)")
    final_norm = not isinstance(model.norm, nn.Identity)
    return dict(
        img_size=tuple(pe.img_size),
        patch_size=ph,
        in_chans=pe.proj.in_channels,
        dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=first.attn.num_heads,
        mlp_dim=first.mlp.fc1.out_features,
        qkv_bias=first.attn.qkv.bias is not None,
        layer_scale=not isinstance(first.ls1, nn.Identity),
        gelu_approximate=act,
        norm_eps=norm_eps,
        class_token=model.cls_token is not None,
        reg_tokens=model.num_reg_tokens,
        pos_embed_prefix=not model.no_embed_class,
        final_norm=final_norm,
        final_norm_eps=model.norm.eps if final_norm else norm_eps,
        map_head=map_head,
        dynamic_img_size=model.dynamic_img_size,
        preprocessing=PreprocessConfig.from_timm(model),
    )
