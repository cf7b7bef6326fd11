"""Weight conversion: rename tables and loaders from published formats to vlakit blocks.

Lives beside the model code, not inside it: blocks never import this package.
"""

from vlakit.convert.decoders import (
    HF_DECODER_RULES,
    convert_hf_decoder_state_dict,
    decoder_from_transformers,
    decoder_spec,
    load_hf_decoder_state_dict,
)
from vlakit.convert.export import (
    decoder_to_transformers,
    openvla_state_dict,
    paligemma_to_transformers,
    save_openvla,
    vit_to_transformers,
)
from vlakit.convert.lora import LoraAdapter, MergedCheckpoint
from vlakit.convert.rename import Rules, rename_keys
from vlakit.convert.vision import (
    load_openvla_vision,
    open_clip_to_vit,
    openvla_tower_state_dict,
    openvla_vision_state_dicts,
    siglip_vit_spec,
    timm_to_vit,
    timm_vit_spec,
    transformers_siglip_to_vit,
    vit_from_timm,
    vit_from_transformers,
)
from vlakit.core.checkpoint import (
    CheckpointFiles,
    LoadReport,
    load_into,
    read_torch_weights,
    strip_prefix,
)

__all__ = [
    "Rules",
    "rename_keys",
    "HF_DECODER_RULES",
    "convert_hf_decoder_state_dict",
    "load_hf_decoder_state_dict",
    "decoder_from_transformers",
    "decoder_spec",
    "CheckpointFiles",
    "LoadReport",
    "load_into",
    "read_torch_weights",
    "strip_prefix",
    "LoraAdapter",
    "decoder_to_transformers",
    "vit_to_transformers",
    "paligemma_to_transformers",
    "openvla_state_dict",
    "save_openvla",
    "MergedCheckpoint",
    "siglip_vit_spec",
    "timm_vit_spec",
    "vit_from_timm",
    "vit_from_transformers",
    "timm_to_vit",
    "open_clip_to_vit",
    "transformers_siglip_to_vit",
    "openvla_vision_state_dicts",
    "openvla_tower_state_dict",
    "load_openvla_vision",
]
