"""open_clip models whose vision tower is a timm trunk (``visual.trunk.*``: the SigLIP and
other ``timm_model_name`` towers) -> the own [`ViT`][vlakit.vision.ViT]. Native open_clip
towers (``visual.transformer.*``) load through ``OpenClipEncoder`` instead."""

from collections.abc import Mapping

from torch import Tensor

from vlakit.convert.timm import timm_to_vit
from vlakit.core.checkpoint import CheckpointError

__all__ = ["open_clip_to_vit"]


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
