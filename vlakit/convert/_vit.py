"""The own [`ViT`][vlakit.vision.ViT]'s key grammar, which every source maps onto, and its
build-then-fill step (private: shared by the timm, transformers, open_clip and OpenVLA
readers).

The grammar equals timm's ``VisionTransformer``::

    cls_token  reg_token  pos_embed  patch_embed.proj.{weight,bias}  norm_pre.{weight,bias}
    blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
    blocks.{i}.ls{1,2}.gamma           blocks.{i}.film.{scale,shift}.{weight,bias}
    norm.{weight,bias}                 attn_pool.{latent,q,kv,proj,norm,mlp.fc1,mlp.fc2}.*
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vlakit.core.checkpoint import load_checked
from vlakit.vision import ViT, vit


def vit_rules(attn_pool: bool) -> list[tuple[str, str | None]]:
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


def build_and_load(
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
