"""Weight conversion for the own :class:`~vlakit.vision.ViT`: one rename table per source.

The ViT's own key grammar equals timm's ``VisionTransformer``::

    cls_token  reg_token  pos_embed  patch_embed.proj.{weight,bias}
    blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
    blocks.{i}.ls{1,2}.gamma           blocks.{i}.film.{scale,shift}.{weight,bias}
    norm.{weight,bias}                 attn_pool.{latent,q,kv,proj,norm,mlp.fc1,mlp.fc2}.*

Sources:

- timm ``VisionTransformer`` (SigLIP, DINOv2): identity; the classifier (``head``,
  ``fc_norm``) is dropped.
- transformers ``SiglipVisionModel``: renamed, separate q/k/v fused into ``qkv``, the
  position embedding reshaped, the pooling head's ``in_proj`` split into ``q``/``kv``.
- OpenVLA (prismatic) ``vision_backbone.featurizer.*`` (DINOv2) and
  ``vision_backbone.fused_featurizer.*`` (SigLIP): timm keys, except LayerScale named
  ``ls{1,2}.scale_factor``; OpenVLA-OFT FiLM-wrapped blocks (``blocks.{i}.block.*``,
  ``blocks.{i}.{scale,shift}.*``) are accepted too.

A key that matches no rule raises :class:`CheckpointError` naming it; so do missing keys
and shape mismatches in :func:`load_checked`.
"""

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from vlakit.core.checkpoint import CheckpointError, load_checked

__all__ = [
    "CheckpointError",
    "rename_keys",
    "timm_to_vit",
    "transformers_siglip_to_vit",
    "openvla_vision_state_dicts",
    "load_checked",
    "load_openvla_vision",
]

Rules = Sequence[tuple[str, str | None]]


def rename_keys(
    state_dict: Mapping[str, Tensor], rules: Rules, source: str, strict: bool = True
) -> dict[str, Tensor]:
    """Rename every key by the first rule whose regex fully matches it.

    Args:
        state_dict: source weights.
        rules: ``(pattern, replacement)`` pairs; ``replacement`` uses ``\\1``-style groups,
            ``None`` drops the key.
        source: name of the format, for error messages.
        strict: raise on a key no rule matches (else keep it unchanged).
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            match = re.fullmatch(pattern, key)
            if match:
                if replacement is not None:
                    out[match.expand(replacement)] = value
                break
        else:
            if strict:
                raise CheckpointError(f"{source} checkpoint key {key!r} matches no rename rule")
            out[key] = value
    return out


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
        (r"blocks\.(\d+)\.ls([12])\.gamma", r"blocks.\1.ls\2.gamma"),
        (rf"blocks\.(\d+)\.film\.(scale|shift)\.{wb}", r"blocks.\1.film.\2.\3"),
        (rf"norm\.{wb}", r"norm.\1"),
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
            raise CheckpointError(f"no checkpoint key starts with prefix {prefix!r}")
    wb = r"(weight|bias)"
    layer = r"encoder\.layers\.(\d+)"
    rules = [
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
    renamed = rename_keys(state_dict, rules, "transformers SigLIP")
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
            raise CheckpointError(f"checkpoint lacks the {absent} projection(s) for {key!r}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _openvla_tower_to_vit(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
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
    key, or a key no rule knows, raises :class:`CheckpointError` naming it.

    Returns:
        ``(featurizer, fused_featurizer)`` state dicts with own-ViT keys. They still hold
        the parts OpenVLA never uses (last block, final norms, SigLIP's ``attn_pool``):
        :func:`load_checked` skips them for a truncated ViT, see :func:`load_openvla_vision`.
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
            raise CheckpointError(f"OpenVLA checkpoint has no {prefix}{tower}* keys")
    return (
        _openvla_tower_to_vit(towers["featurizer."], f"OpenVLA ({prefix}featurizer.)"),
        _openvla_tower_to_vit(towers["fused_featurizer."], f"OpenVLA ({prefix}fused_featurizer.)"),
    )


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
    for vit, weights, name in towers:
        ignore = ("attn_pool.",) if getattr(vit, "attn_pool", None) is None else ()
        load_checked(vit, weights, ignore_prefixes=ignore, source=f"OpenVLA {prefix}{name}")
