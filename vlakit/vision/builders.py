"""Builders for the own ViT: one component builder taking every knob, and named sizes.

Build full-size towers on the ``meta`` device to inspect them without allocating, and
materialise them later (every parameter has a ``reset_parameters``)::

    with torch.device("meta"):
        tower = siglip_so400m()
    tower.to_empty(device="cuda")
    vlakit.core.init_parameters(tower)   # or load a checkpoint

Every builder takes ``linear`` (a [`LinearFactory`][vlakit.core.LinearFactory], default
``nn.Linear``) for the attention, MLP and pooling-head projections.
"""

from collections.abc import Sequence

from torch import nn

from vlakit.core.linear import LinearFactory
from vlakit.vision.fused import FusedEncoder
from vlakit.vision.preprocess import PreprocessConfig
from vlakit.vision.vit import GeluApproximate, MAPHead, ViT, ViTBlock

__all__ = ["vit", "siglip_so400m", "dinov2_large_reg4", "openvla_fused_encoder"]


def vit(
    *,
    img_size: int | Sequence[int] = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_dim: int = 3072,
    qkv_bias: bool = True,
    layer_scale_init: float | None = None,
    gelu_approximate: GeluApproximate = "none",
    norm_eps: float = 1e-6,
    class_token: bool = False,
    reg_tokens: int = 0,
    pos_embed_prefix: bool = False,
    final_norm: bool = True,
    map_head: bool = False,
    output_layer: int = -1,
    dynamic_img_size: bool = False,
    preprocessing: PreprocessConfig | None = None,
    linear: LinearFactory = nn.Linear,
    pre_norm: bool = False,
    patch_bias: bool = True,
) -> ViT:
    """Component builder: a [`ViT`][vlakit.vision.ViT] from plain numbers.

    Args:
        img_size: image size the position embedding is built for.
        patch_size: square patch size.
        in_chans: input channels.
        dim: token width.
        depth: number of blocks.
        num_heads: attention heads (blocks and MAP head).
        mlp_dim: MLP hidden width (blocks and MAP head).
        qkv_bias: bias on the qkv projections.
        layer_scale_init: LayerScale initial value (DINOv2: ``1e-5``); ``None`` = none.
        gelu_approximate: ``"none"`` (exact), ``"tanh"`` or ``"quick"`` (CLIP).
        norm_eps: LayerNorm epsilon everywhere.
        class_token: prepend a CLS token.
        reg_tokens: register tokens.
        pos_embed_prefix: position embedding covers the prefix tokens too.
        final_norm: LayerNorm after the last block.
        map_head: add a MAP attention-pooling head (``attn_pool``).
        output_layer: block whose output ``forward`` returns (``-2``: second-to-last).
        dynamic_img_size: interpolate the position embedding for other image sizes.
        preprocessing: size/mean/std/interpolation (default: ``img_size``, 0.5/0.5).
        linear: factory for every projection (``qkv``, ``proj``, ``fc1``, ``fc2``, ``q``,
            ``kv``), called as ``linear(in_features, out_features, bias=...)``.
        pre_norm: a LayerNorm before the first block (CLIP).
        patch_bias: a bias on the patch convolution (CLIP: none).
    """
    blocks = [
        ViTBlock(
            dim,
            num_heads,
            mlp_dim,
            qkv_bias=qkv_bias,
            layer_scale_init=layer_scale_init,
            gelu_approximate=gelu_approximate,
            norm_eps=norm_eps,
            linear=linear,
        )
        for _ in range(depth)
    ]
    return ViT(
        blocks,
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        class_token=class_token,
        reg_tokens=reg_tokens,
        pos_embed_prefix=pos_embed_prefix,
        norm=nn.LayerNorm(dim, eps=norm_eps) if final_norm else None,
        attn_pool=MAPHead(dim, num_heads, mlp_dim, gelu_approximate, norm_eps, linear=linear)
        if map_head
        else None,
        output_layer=output_layer,
        norm_pre=nn.LayerNorm(dim, eps=norm_eps) if pre_norm else None,
        patch_bias=patch_bias,
        dynamic_img_size=dynamic_img_size,
        preprocessing=preprocessing,
    )


def siglip_so400m(
    img_size: int = 224,
    *,
    map_head: bool = False,
    gelu_approximate: GeluApproximate = "tanh",
    output_layer: int = -1,
    dynamic_img_size: bool = False,
    preprocessing: PreprocessConfig | None = None,
    linear: LinearFactory = nn.Linear,
) -> ViT:
    """SigLIP So400m/14: 27 blocks, width 1152, 16 heads, MLP 4304, no CLS token.

    412,442,352 parameters at 224 px without the MAP head, 427,680,704 with it (as timm's
    ``vit_so400m_patch14_siglip_224``). Preprocessing: mean = std = 0.5, bicubic.

    Args:
        img_size: image size (224 → 256 patches).
        map_head: include the attention-pool head (PaliGemma and OpenVLA do not use it).
        gelu_approximate: ``"tanh"`` as SigLIP was trained (HF, big_vision, PaliGemma);
            ``"none"`` reproduces timm-based models bit-for-bit (OpenVLA's prismatic uses
            timm, whose default is exact GELU).
        output_layer: block to return (OpenVLA: ``-2``).
        dynamic_img_size: interpolate the position embedding for other sizes.
        preprocessing: instead of mean = std = 0.5 bicubic stretch (pi0 uses LeRobot's
            letterbox: [pi0_preprocessing][vlakit.models.pi0_preprocessing]).
        linear: factory for the projections.
    """
    return vit(
        img_size=img_size,
        patch_size=14,
        dim=1152,
        depth=27,
        num_heads=16,
        mlp_dim=4304,
        gelu_approximate=gelu_approximate,
        map_head=map_head,
        output_layer=output_layer,
        dynamic_img_size=dynamic_img_size,
        preprocessing=preprocessing or PreprocessConfig(size=img_size, mean=(0.5,) * 3,
                                                        std=(0.5,) * 3),
        linear=linear,
    )


def dinov2_large_reg4(
    img_size: int = 224,
    *,
    output_layer: int = -1,
    dynamic_img_size: bool = False,
    linear: LinearFactory = nn.Linear,
) -> ViT:
    """DINOv2 ViT-L/14 with 4 registers: 24 blocks, width 1024, LayerScale, CLS + 4 registers,
    position embedding over patches only (timm ``vit_large_patch14_reg4_dinov2``).

    303,230,976 parameters at 224 px. Preprocessing: ImageNet mean/std, bicubic.

    Args:
        img_size: image size (224 → 256 patches; DINOv2 was trained at 518).
        output_layer: block to return (OpenVLA: ``-2``).
        dynamic_img_size: interpolate the position embedding for other sizes.
        linear: factory for the projections.
    """
    return vit(
        img_size=img_size,
        patch_size=14,
        dim=1024,
        depth=24,
        num_heads=16,
        mlp_dim=4096,
        layer_scale_init=1e-5,
        class_token=True,
        reg_tokens=4,
        pos_embed_prefix=False,
        output_layer=output_layer,
        dynamic_img_size=dynamic_img_size,
        preprocessing=PreprocessConfig(
            size=img_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
        ),
        linear=linear,
    )


def openvla_fused_encoder(
    img_size: int = 224,
    *,
    truncate: bool = True,
    gelu_approximate: GeluApproximate = "none",
    linear: LinearFactory = nn.Linear,
) -> FusedEncoder:
    """OpenVLA's vision backbone: DINOv2 ViT-L/14 reg4 + SigLIP So400m/14, both returning
    the second-to-last block → ``[b, 256, 2176]`` at 224 px; 6-channel pixels.

    Args:
        img_size: image size of both towers.
        truncate: drop the last block, final norms (never used) — 43.1M fewer parameters
            counting SigLIP's unused pooling head, which is not built here.
        gelu_approximate: SigLIP's GELU; OpenVLA runs timm's exact GELU (``"none"``).
        linear: factory for the projections of both towers.
    """
    dino = dinov2_large_reg4(img_size, output_layer=-2, linear=linear)
    siglip = siglip_so400m(
        img_size, output_layer=-2, gelu_approximate=gelu_approximate, linear=linear
    )
    if truncate:
        dino.truncate()
        siglip.truncate()
    return FusedEncoder([dino, siglip])
