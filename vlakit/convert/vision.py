"""Weight conversion for the own [`ViT`][vlakit.vision.ViT]: architecture readers and one
rename table per source format.

The ViT's own key grammar equals timm's ``VisionTransformer``::

    cls_token  reg_token  pos_embed  patch_embed.proj.{weight,bias}
    blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
    blocks.{i}.ls{1,2}.gamma           blocks.{i}.film.{scale,shift}.{weight,bias}
    norm.{weight,bias}                 attn_pool.{latent,q,kv,proj,norm,mlp.fc1,mlp.fc2}.*

Sources:

- timm ``VisionTransformer`` (SigLIP, DINOv2; also open_clip's timm trunks under
  ``visual.trunk.*``): identity; the classifier (``head``, ``fc_norm``) is dropped.
  [`vit_from_timm`][vlakit.convert.vit_from_timm] reads the architecture too.
- transformers ``SiglipVisionModel``: renamed, separate q/k/v fused into ``qkv``, the
  position embedding reshaped, the pooling head's ``in_proj`` split into ``q``/``kv``
  ([`vit_from_transformers`][vlakit.convert.vit_from_transformers] reads the config).
- OpenVLA (prismatic) ``vision_backbone.featurizer.*`` (DINOv2) and
  ``vision_backbone.fused_featurizer.*`` (SigLIP): timm keys, except LayerScale named
  ``ls{1,2}.scale_factor``; OpenVLA-OFT FiLM-wrapped blocks (``blocks.{i}.block.*``,
  ``blocks.{i}.{scale,shift}.*``) are accepted too.

Keys are renamed only by [`rename_keys`][vlakit.convert.rename_keys]: a key that matches no
rule raises [`CheckpointError`][vlakit.core.CheckpointError] naming it; so do missing keys
and shape mismatches in [`load_checked`][vlakit.core.load_checked]. Architectures are built
only through the vision builders ([`vit`][vlakit.vision]), on the ``meta`` device, then
filled from the source model.
"""

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vlakit.convert.rename import Rules, rename_keys
from vlakit.core.checkpoint import CheckpointError, load_checked
from vlakit.vision import PreprocessConfig, ViT, vit
from vlakit.vision.base import as_hw

__all__ = [
    "vit_from_timm",
    "vit_from_transformers",
    "timm_to_vit",
    "open_clip_to_vit",
    "transformers_siglip_to_vit",
    "openvla_vision_state_dicts",
    "openvla_tower_state_dict",
    "load_openvla_vision",
    "siglip_vit_spec",
    "timm_vit_spec",
]


# ---------------------------------------------------------------- rename tables
def _vit_rules(attn_pool: bool) -> list[tuple[str, str | None]]:
    """The own ViT's key grammar, as identity rules (``attn_pool=False`` drops the head)."""
    wb = r"(weight|bias)"
    return [
        (r"(cls_token|reg_token|pos_embed)", r"\1"),
        (rf"patch_embed\.proj\.{wb}", r"patch_embed.proj.\1"),
        (
            rf"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.{wb}",
            r"blocks.\1.\2.\3",
        ),
        # timm's name, and Prismatic's (OpenVLA patches LayerScale to hold `scale_factor`)
        (r"blocks\.(\d+)\.ls([12])\.(?:gamma|scale_factor)", r"blocks.\1.ls\2.gamma"),
        (rf"blocks\.(\d+)\.film\.(scale|shift)\.{wb}", r"blocks.\1.film.\2.\3"),
        (rf"norm\.{wb}", r"norm.\1"),
        (rf"norm_pre\.{wb}", r"norm_pre.\1"),
        (r"attn_pool\.latent", r"attn_pool.latent" if attn_pool else None),
        (
            rf"attn_pool\.(q|kv|proj|norm|mlp\.fc1|mlp\.fc2)\.{wb}",
            r"attn_pool.\1.\2" if attn_pool else None,
        ),
    ]


def timm_to_vit(state_dict: Mapping[str, Tensor], has_attn_pool: bool = True) -> dict[str, Tensor]:
    """timm ``VisionTransformer`` state dict → own ViT keys (identity; classifier dropped).

    Args:
        state_dict: ``model.state_dict()`` of a timm ViT.
        has_attn_pool: keep the MAP head (``attn_pool.*``); ``False`` drops it.
    """
    rules = _vit_rules(has_attn_pool) + [(r"(head|fc_norm)\.(weight|bias)", None)]
    return rename_keys(state_dict, rules, "timm")


def open_clip_to_vit(
    state_dict: Mapping[str, Tensor], has_attn_pool: bool = True
) -> dict[str, Tensor]:
    """An open_clip model's timm vision trunk (``visual.trunk.*``: the SigLIP and other
    ``timm_model_name`` towers, e.g. ``ViT-SO400M-14-SigLIP``) → own ViT keys. The text
    tower, ``logit_scale`` and the trunk's classifier are dropped; build the ViT with
    [vit_from_timm][vlakit.convert.vit_from_timm] on ``model.visual.trunk``, or from
    [timm_vit_spec][vlakit.convert.timm_vit_spec] of the same timm model, and load these."""
    prefix = "visual.trunk."
    trunk = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not trunk:
        others = sorted({k.split(".")[0] for k in state_dict})
        raise CheckpointError(
            f"no open_clip timm trunk keys ({prefix}*) in this state dict (top-level names: "
            f"{others}); native open_clip towers (visual.transformer.*) load through "
            f"OpenClipEncoder instead"
        )
    return timm_to_vit(trunk, has_attn_pool=has_attn_pool)


def _siglip_rules() -> Rules:
    wb = r"(weight|bias)"
    layer = r"encoder\.layers\.(\d+)"
    return [
        (rf"embeddings\.patch_embedding\.{wb}", r"patch_embed.proj.\1"),
        (r"embeddings\.position_embedding\.weight", "pos_embed"),
        (r"embeddings\.position_ids", None),
        (rf"{layer}\.layer_norm([12])\.{wb}", r"blocks.\1.norm\2.\3"),
        (rf"{layer}\.self_attn\.([qkv])_proj\.{wb}", r"blocks.\1.attn.\2.\3"),
        (rf"{layer}\.self_attn\.out_proj\.{wb}", r"blocks.\1.attn.proj.\2"),
        (rf"{layer}\.mlp\.(fc1|fc2)\.{wb}", r"blocks.\1.mlp.\2.\3"),
        (rf"post_layernorm\.{wb}", r"norm.\1"),
        (r"head\.probe", "attn_pool.latent"),
        (rf"head\.attention\.in_proj_{wb}", r"attn_pool.in_proj.\1"),
        (rf"head\.attention\.out_proj\.{wb}", r"attn_pool.proj.\1"),
        (rf"head\.layernorm\.{wb}", r"attn_pool.norm.\1"),
        (rf"head\.mlp\.(fc1|fc2)\.{wb}", r"attn_pool.mlp.\1.\2"),
    ]


def transformers_siglip_to_vit(
    state_dict: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """transformers ``SiglipVisionModel`` state dict → own ViT keys.

    Args:
        state_dict: the vision model's state dict (transformers 5.x names:
            ``embeddings.*``, ``encoder.layers.*``, ``post_layernorm.*``, ``head.*``).
        prefix: only keys starting with it are converted, with it stripped (e.g.
            ``"vision_model."`` for Hub SigLIP files, ``"vision_tower.vision_model."`` for
            Hub PaliGemma files, ``"model.vision_tower."`` for transformers 5.x PaliGemma).
    """
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise CheckpointError(
                f"expected transformers SigLIP keys under the prefix {prefix!r}, but no "
                "checkpoint key starts with it"
            )
    renamed = rename_keys(state_dict, _siglip_rules(), "transformers SigLIP")
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in renamed.items():
        match = re.fullmatch(r"blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)", key)
        if match:
            qkv.setdefault(f"blocks.{match[1]}.attn.qkv.{match[3]}", {})[match[2]] = value
        elif key == "pos_embed":
            out[key] = value[None]  # [n, d] -> [1, n, d]
        elif key.startswith("attn_pool.in_proj."):
            kind = key.rsplit(".", 1)[1]
            d = value.shape[0] // 3
            out[f"attn_pool.q.{kind}"] = value[:d]
            out[f"attn_pool.kv.{kind}"] = value[d:]
        else:
            out[key] = value
    for key, parts in qkv.items():
        absent = [p for p in "qkv" if p not in parts]
        if absent:
            raise CheckpointError(
                f"fusing {key!r} needs the q, k and v projections, but the checkpoint lacks "
                f"{', '.join(absent)}"
            )
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _openvla_tower_to_vit(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    wb = r"(weight|bias)"
    oft_and_prismatic = [
        (r"blocks\.(\d+)\.block\.(.+)", r"blocks.\1.\2"),  # OFT FiLM wrapper
        (rf"blocks\.(\d+)\.(scale|shift)\.{wb}", r"blocks.\1.film.\2.\3"),
    ]
    renamed = rename_keys(state_dict, oft_and_prismatic, source, strict=False)
    layer_scale = [(r"blocks\.(\d+)\.ls([12])\.(?:scale_factor|gamma)", r"blocks.\1.ls\2.gamma")]
    renamed = rename_keys(renamed, layer_scale, source, strict=False)
    return rename_keys(renamed, _vit_rules(attn_pool=True), source)


def openvla_vision_state_dicts(
    state_dict: Mapping[str, Tensor], prefix: str = "vision_backbone."
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an OpenVLA(-OFT) state dict into own-ViT state dicts for its two towers.

    Keys outside ``prefix`` (projector, language model) are ignored. Under ``prefix`` only
    ``featurizer.*`` (DINOv2) and ``fused_featurizer.*`` (SigLIP) are allowed; any other
    key, or a key no rule knows, raises [`CheckpointError`][vlakit.core.CheckpointError]
    naming it.

    Returns:
        ``(featurizer, fused_featurizer)`` state dicts with own-ViT keys. They still hold
        the parts OpenVLA never uses (last block, final norms, SigLIP's ``attn_pool``):
        [`load_checked`][vlakit.core.load_checked] skips them for a truncated ViT, see
        [`load_openvla_vision`][vlakit.convert.load_openvla_vision].
    """
    towers: dict[str, dict[str, Tensor]] = {"featurizer.": {}, "fused_featurizer.": {}}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        tower = next((t for t in towers if rest.startswith(t)), None)
        if tower is None:
            raise CheckpointError(
                f"OpenVLA checkpoint key {key!r} is neither {prefix}featurizer.* nor "
                f"{prefix}fused_featurizer.*"
            )
        towers[tower][rest[len(tower) :]] = value
    for tower, weights in towers.items():
        if not weights:
            raise CheckpointError(
                f"expected OpenVLA vision keys {prefix}{tower}*, but the checkpoint has none"
            )
    return (
        _openvla_tower_to_vit(towers["featurizer."], f"OpenVLA ({prefix}featurizer.)"),
        _openvla_tower_to_vit(towers["fused_featurizer."], f"OpenVLA ({prefix}fused_featurizer.)"),
    )


def openvla_tower_state_dict(
    state_dict: Mapping[str, Any], tower: str, prefix: str = "vision_backbone."
) -> dict[str, Any]:
    """One OpenVLA vision tower (``tower``: ``"featurizer"`` or ``"fused_featurizer"``) as
    an own-ViT state dict; keys outside ``{prefix}{tower}.`` are ignored, a key inside that
    no rule knows raises [`CheckpointError`][vlakit.core.CheckpointError]. Single-tower
    Prismatic backbones store ``featurizer`` alone. Values pass through untouched (a
    loader renames ``{key: key}`` to plan a load)."""
    start = f"{prefix}{tower}."
    weights = {k[len(start):]: v for k, v in state_dict.items() if k.startswith(start)}
    if not weights:
        raise CheckpointError(f"expected OpenVLA vision keys {start}*, but the checkpoint has none")
    return _openvla_tower_to_vit(weights, f"OpenVLA ({start})")


def load_openvla_vision(
    featurizer: nn.Module,
    fused_featurizer: nn.Module,
    state_dict: Mapping[str, Tensor],
    prefix: str = "vision_backbone.",
) -> None:
    """Load OpenVLA's vision weights into an own-ViT pair (DINOv2, SigLIP), in place.

    Build the pair with ``output_layer=-2`` (OpenVLA's choice) and call ``truncate()``
    on it, or keep the full depth: the checkpoint's unused parts (last block, final norms)
    are skipped for truncated towers, and SigLIP's ``attn_pool`` is skipped when the tower
    has no pooling head.
    """
    dino, siglip = openvla_vision_state_dicts(state_dict, prefix=prefix)
    towers = ((featurizer, dino, "featurizer"), (fused_featurizer, siglip, "fused_featurizer"))
    for tower, weights, name in towers:
        ignore = ("attn_pool.",) if getattr(tower, "attn_pool", None) is None else ()
        load_checked(tower, weights, ignore_prefixes=ignore, source=f"OpenVLA {prefix}{name}")


# ---------------------------------------------------------------- architecture readers
def _build_and_load(
    spec: dict[str, Any], weights: Mapping[str, Tensor], source: nn.Module, what: str
) -> ViT:
    """Build through [`vit`][vlakit.vision] on the meta device (no initialisation
    cost), allocate like ``source``'s parameters, fill from ``weights``."""
    param = next(source.parameters())
    with torch.device("meta"):
        model = vit(**spec)
    model = model.to_empty(device=param.device).to(param.dtype)
    load_checked(model, weights, source=what)
    return model


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


_WRAP_TIMM = "; wrap the timm model with TimmEncoder instead"


def timm_vit_spec(model: nn.Module, output_layer: int = -1) -> dict[str, Any]:
    """Read a timm ``VisionTransformer`` (built on any device, ``meta`` included) into
    [`vit`][vlakit.vision] arguments, refusing what the own ViT cannot express; the
    preprocessing comes from the model's ``pretrained_cfg``."""
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"vit_from_timm expects a timm VisionTransformer, got a {type(model).__name__}"
        )
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
    norm_eps = first.norm1.eps
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
    ls = first.ls1
    return dict(
        img_size=tuple(pe.img_size),
        patch_size=ph,
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
        final_norm=final_norm,
        map_head=head is not None,
        output_layer=output_layer,
        dynamic_img_size=model.dynamic_img_size,
        preprocessing=PreprocessConfig.from_timm(model),
        pre_norm=pre_norm,
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
    return _build_and_load(spec, weights, model, "timm VisionTransformer")


def vit_from_transformers(
    model: nn.Module,
    output_layer: int = -1,
    preprocessing: PreprocessConfig | None = None,
) -> ViT:
    """Copy a transformers ``SiglipVisionModel`` (or a ``SiglipModel``'s vision half) into
    the own [`ViT`][vlakit.vision.ViT], on the source's device and dtype.

    Args:
        model: the transformers model.
        output_layer: block whose output the ViT returns.
        preprocessing: defaults to SigLIP's: the config's image size, mean = std = 0.5,
            bicubic.
    """
    if hasattr(model, "vision_model"):
        model = model.vision_model
    config = getattr(model, "config", None)
    map_head = bool(getattr(model, "use_head", getattr(config, "vision_use_head", True)))
    spec = siglip_vit_spec(config, output_layer, preprocessing, map_head=map_head)
    weights = transformers_siglip_to_vit(model.state_dict())
    return _build_and_load(spec, weights, model, "transformers SiglipVisionModel")


def siglip_vit_spec(
    config: Any,
    output_layer: int = -1,
    preprocessing: PreprocessConfig | None = None,
    map_head: bool | None = None,
) -> dict[str, Any]:
    """The own ViT's arguments ([`vit`][vlakit.vision]) for a transformers
    ``SiglipVisionConfig``: the architecture from the config alone, nothing built.
    ``map_head`` defaults to the config's ``vision_use_head``."""
    model_type = getattr(config, "model_type", None)
    if model_type != "siglip_vision_model":
        raise TypeError(
            "expected a SigLIP vision config (model_type 'siglip_vision_model'), got "
            f"{type(config).__name__} with model_type {model_type!r}"
        )
    act = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}.get(config.hidden_act)
    if act is None:
        raise ValueError(
            "SigLIP's hidden_act must be 'gelu_pytorch_tanh', 'gelu_new' or 'gelu', got "
            f"{config.hidden_act!r}"
        )
    size = as_hw(config.image_size)
    if map_head is None:
        map_head = bool(getattr(config, "vision_use_head", True))
    return dict(
        img_size=size,
        patch_size=int(config.patch_size),
        in_chans=config.num_channels,
        dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        qkv_bias=True,
        layer_scale_init=None,
        gelu_approximate=act,
        norm_eps=config.layer_norm_eps,
        class_token=False,
        reg_tokens=0,
        pos_embed_prefix=False,
        final_norm=True,
        map_head=map_head,
        output_layer=output_layer,
        dynamic_img_size=False,
        preprocessing=preprocessing or PreprocessConfig(size=size, mean=(0.5,) * 3, std=(0.5,) * 3),
    )
