"""Vision encoders: pixels → patch tokens, for one or several camera views.

Every encoder is a [`VisionEncoder`][vlakit.vision.VisionEncoder]: it declares its token
width ``dim``, its patch count (``num_patches(image_size)``, ``patches_per_image``) and its
preprocessing (``preprocessing``: size, mean, std, interpolation; ``preprocess(images)``
applies it), and maps preprocessed pixels ``[b, c, h, w]`` or ``[b, v, c, h, w]`` to tokens
``[b, v·p, d]``, optionally FiLM-conditioned on a vector ``[b, k]`` (``has_film`` says
whether an encoder takes one).

Of vlakit, this package imports only ``vlakit.core`` (the linear-layer factory type);
the strict loader ``load_checked`` and ``CheckpointError`` are core's names, imported from
[vlakit.core][vlakit.core] (not re-exported here). The wrappers and the ViT's
position-embedding resampling use timm / transformers / open_clip. Weight conversion (timm,
transformers, open_clip, OpenVLA) lives in [`vlakit.convert`][vlakit.convert], which
imports this package, never the reverse.
"""

from vlakit.vision.base import VisionEncoder, stack_views
from vlakit.vision.builders import dinov2_large_reg4, openvla_fused_encoder, siglip_so400m, vit
from vlakit.vision.film import FiLM, FiLMTimmBlock, add_film
from vlakit.vision.fused import FusedEncoder
from vlakit.vision.preprocess import PreprocessConfig, images_to_tensor, preprocess_images
from vlakit.vision.vit import (
    LayerScale,
    MAPHead,
    PatchEmbed,
    ViT,
    ViTAttention,
    ViTBlock,
    ViTMLP,
)
from vlakit.vision.wrappers import HFVisionEncoder, OpenClipEncoder, TimmEncoder

__all__ = [
    "VisionEncoder",
    "stack_views",
    "PreprocessConfig",
    "preprocess_images",
    "images_to_tensor",
    "ViT",
    "ViTBlock",
    "ViTAttention",
    "ViTMLP",
    "LayerScale",
    "PatchEmbed",
    "MAPHead",
    "vit",
    "siglip_so400m",
    "dinov2_large_reg4",
    "openvla_fused_encoder",
    "FusedEncoder",
    "TimmEncoder",
    "OpenClipEncoder",
    "HFVisionEncoder",
    "FiLM",
    "FiLMTimmBlock",
    "add_film",
]
