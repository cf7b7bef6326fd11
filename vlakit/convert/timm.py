"""timm ``VisionTransformer`` (SigLIP, DINOv2, CLIP as timm builds them; also open_clip's
and Prismatic's timm towers) -> the own [`ViT`][vlakit.vision.ViT].

The own ViT's key grammar is timm's, so the weights map by identity (the classifier,
``head`` and ``fc_norm``, is dropped); [`timm_vit_spec`][vlakit.convert.timm_vit_spec]
reads the architecture from a timm model (on any device, ``meta`` included) and refuses
what the own ViT cannot express.
"""

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from vlakit.convert._vit import build_and_load, vit_rules
from vlakit.convert.rename import rename_keys
from vlakit.vision import PreprocessConfig, ViT

__all__ = ["timm_to_vit", "timm_vit_spec", "vit_from_timm"]

_WRAP_TIMM = "; wrap the timm model with TimmEncoder instead"


def timm_to_vit(state_dict: Mapping[str, Tensor], has_attn_pool: bool = True) -> dict[str, Tensor]:
    """timm ``VisionTransformer`` state dict → own ViT keys (identity; classifier dropped).

    Args:
        state_dict: ``model.state_dict()`` of a timm ViT.
        has_attn_pool: keep the MAP head (``attn_pool.*``); ``False`` drops it.
    """
    rules = vit_rules(has_attn_pool) + [(r"(head|fc_norm)\.(weight|bias)", None)]
    return rename_keys(state_dict, rules, "timm")


def _gelu_kind(act: nn.Module) -> str:
    from timm.layers.activations import GELU as TimmGELU
    from timm.layers.activations import GELUTanh, QuickGELU

    if isinstance(act, nn.GELU):
        return act.approximate
    if isinstance(act, GELUTanh):
        return "tanh"
    if isinstance(act, TimmGELU):
        return "none"
    if isinstance(act, QuickGELU):
        return "quick"
    raise ValueError(
        f"vlakit's ViT supports GELU (exact, tanh or quick) only, got the activation "
        f"{type(act).__name__}"
    )


def _check_embedding(model: nn.Module) -> None:
    """Square patches, no patch-embedding norm, a learned position embedding, and a
    LayerNorm (or nothing) before the blocks."""
    pe = model.patch_embed
    ph, pw = pe.patch_size
    if ph != pw:
        raise ValueError(
            f"vlakit's ViT needs square patches, got a {ph}x{pw} patch{_WRAP_TIMM}"
        )
    pre_norm = not isinstance(model.norm_pre, nn.Identity)  # CLIP's ln_pre
    if pre_norm and not isinstance(model.norm_pre, nn.LayerNorm):
        raise ValueError(
            f"unsupported pre-norm {type(model.norm_pre).__name__} (vlakit's ViT has a "
            f"LayerNorm there){_WRAP_TIMM}"
        )
    if not isinstance(pe.norm, nn.Identity):
        raise ValueError(
            "vlakit's ViT's patch embedding has no norm; this timm model's has "
            f"norm={type(pe.norm).__name__}{_WRAP_TIMM}"
        )
    if model.pos_embed is None:
        raise ValueError(
            "unsupported timm option pos_embed='none' (no position embedding); vlakit's ViT "
            f"needs a learned position embedding{_WRAP_TIMM}"
        )


def _check_blocks(model: nn.Module) -> None:
    """timm's plain ``Block`` with ``Attention`` everywhere, biases, one LayerNorm epsilon."""
    from timm.models.vision_transformer import Attention, Block

    first = model.blocks[0]
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ValueError(
                f"block {i} is a {type(block).__name__} with {type(block.attn).__name__}; "
                f"only timm's Block with Attention is supported{_WRAP_TIMM}"
            )
        if not all(
            isinstance(m, nn.Identity)
            for m in (block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.mlp.norm)
        ):
            raise ValueError(
                f"block {i} uses qk-norm or scale norms, which vlakit's ViT does not "
                f"support{_WRAP_TIMM}"
            )
        if (block.attn.proj.bias is None) or (block.mlp.fc1.bias is None):
            raise ValueError(
                f"block {i} has projections without bias (proj_bias=False), which vlakit's "
                f"ViT does not support{_WRAP_TIMM}"
            )
        for name in ("norm1", "norm2"):
            norm = getattr(block, name)
            if not isinstance(norm, nn.LayerNorm) or norm.eps != first.norm1.eps:
                raise ValueError(
                    f"block {i}: vlakit's ViT needs nn.LayerNorm with one epsilon "
                    f"({first.norm1.eps}) everywhere, got {name} = {norm}{_WRAP_TIMM}"
                )


def _check_head(model: nn.Module, norm_eps: float) -> None:
    """A pooling head the own ViT has (timm's one-latent ``AttentionPoolLatent``) or none,
    and a final norm with the blocks' epsilon."""
    from timm.layers import AttentionPoolLatent

    head = model.attn_pool
    if head is not None:
        if not isinstance(head, AttentionPoolLatent) or head.latent_len != 1 or head.mlp is None:
            raise ValueError(
                "vlakit's ViT's pooling head is timm's AttentionPoolLatent with one latent and "
                f"an MLP, got {type(head).__name__}{_WRAP_TIMM}"
            )
        if head.pos_embed is not None or not isinstance(head.q_norm, nn.Identity):
            raise ValueError(
                "unsupported AttentionPoolLatent options (pos_embed or qk_norm), which vlakit's "
                f"ViT's pooling head does not have{_WRAP_TIMM}"
            )
    final_norm = not isinstance(model.norm, nn.Identity)
    if final_norm and getattr(model.norm, "eps", None) != norm_eps:
        raise ValueError(
            f"vlakit's ViT uses one LayerNorm epsilon; the blocks use {norm_eps}, the final "
            f"norm {getattr(model.norm, 'eps', None)}{_WRAP_TIMM}"
        )


def timm_vit_spec(model: nn.Module, output_layer: int = -1) -> dict[str, Any]:
    """Read a timm ``VisionTransformer`` (built on any device, ``meta`` included) into
    [`vit`][vlakit.vision] arguments, refusing what the own ViT cannot express; the
    preprocessing comes from the model's ``pretrained_cfg``."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"vit_from_timm expects a timm VisionTransformer, got a {type(model).__name__}"
        )
    _check_embedding(model)
    _check_blocks(model)
    pe, first = model.patch_embed, model.blocks[0]
    norm_eps = first.norm1.eps
    _check_head(model, norm_eps)
    ls = first.ls1
    return dict(
        img_size=tuple(pe.img_size),
        patch_size=pe.patch_size[0],
        in_chans=pe.proj.in_channels,
        dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=first.attn.num_heads,
        mlp_dim=first.mlp.fc1.out_features,
        qkv_bias=first.attn.qkv.bias is not None,
        layer_scale_init=None
        if isinstance(ls, nn.Identity)
        else float(getattr(ls, "init_values", 1e-5)),
        gelu_approximate=_gelu_kind(first.mlp.act),
        norm_eps=norm_eps,
        class_token=model.cls_token is not None,
        reg_tokens=model.num_reg_tokens,
        pos_embed_prefix=not model.no_embed_class,
        final_norm=not isinstance(model.norm, nn.Identity),
        map_head=model.attn_pool is not None,
        output_layer=output_layer,
        dynamic_img_size=model.dynamic_img_size,
        preprocessing=PreprocessConfig.from_timm(model),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        patch_bias=pe.proj.bias is not None,
    )


def vit_from_timm(model: nn.Module, output_layer: int = -1) -> ViT:
    """Copy a timm ``VisionTransformer`` (SigLIP / DINOv2 / plain ViT families) into the
    own [`ViT`][vlakit.vision.ViT], on the source's device and dtype.

    Supported: pre-LN ``Block`` s with optional LayerScale, fused qkv, exact or tanh
    GELU, CLS/register tokens, pos-embed with or without prefix, final norm, MAP head
    (``global_pool='map'``; other heads/``fc_norm``/classifier are not copied).
    Unsupported options (``pre_norm``, qk-norm, scale norms, other block types) raise.

    Args:
        model: the timm model.
        output_layer: block whose output the ViT returns (OpenVLA: ``-2``).
    """
    spec = timm_vit_spec(model, output_layer)
    weights = timm_to_vit(model.state_dict(), has_attn_pool=spec["map_head"])
    return build_and_load(spec, weights, model, "timm VisionTransformer")
