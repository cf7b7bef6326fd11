"""Weight conversion: published formats <-> vlakit blocks, one module per source.

- [timm][vlakit.convert.timm_to_vit] (``vlakit.convert.timm``): timm ViTs, whose key
  grammar the own ViT shares;
- open_clip (``vlakit.convert.open_clip``): timm trunks inside open_clip models;
- transformers (``vlakit.convert.transformers``): SigLIP towers and Llama / Gemma decoders,
  read and written back;
- peft (``vlakit.convert.peft``): LoRA adapter folders, merged as they are read;
- OpenVLA (``vlakit.convert.openvla``): Prismatic's tower keys, OpenVLA-OFT's run-folder
  component files, and the published layout written back;
- [rename_keys][vlakit.convert.rename_keys] (``vlakit.convert.rename``): the one renaming
  mechanism they all use.

The checkpoint readers and the strict loader live in [vlakit.core][vlakit.core] and are
re-exported here. Lives beside the model code, not inside it: blocks never import this
package; each family's loader ([vlakit.models][vlakit.models]) uses it.
"""

from vlakit.convert.open_clip import open_clip_to_vit
from vlakit.convert.openvla import (
    OFT_COMPONENTS,
    load_openvla_vision,
    openvla_state_dict,
    openvla_tower_state_dict,
    openvla_vision_state_dicts,
    read_oft_components,
    save_openvla,
)
from vlakit.convert.peft import LoraAdapter, MergedCheckpoint, merge_lora_weight
from vlakit.convert.rename import Rules, rename_keys
from vlakit.convert.timm import timm_to_vit, timm_vit_spec, vit_from_timm
from vlakit.convert.transformers import (
    HF_DECODER_RULES,
    convert_hf_decoder_state_dict,
    decoder_from_transformers,
    decoder_spec,
    decoder_to_transformers,
    load_hf_decoder_state_dict,
    paligemma_to_transformers,
    siglip_vit_spec,
    transformers_siglip_to_vit,
    vit_from_transformers,
    vit_to_transformers,
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
    "CheckpointFiles",
    "LoadReport",
    "load_into",
    "read_torch_weights",
    "strip_prefix",
    # timm
    "timm_to_vit",
    "timm_vit_spec",
    "vit_from_timm",
    # open_clip
    "open_clip_to_vit",
    # transformers
    "siglip_vit_spec",
    "transformers_siglip_to_vit",
    "vit_from_transformers",
    "HF_DECODER_RULES",
    "convert_hf_decoder_state_dict",
    "load_hf_decoder_state_dict",
    "decoder_from_transformers",
    "decoder_spec",
    "decoder_to_transformers",
    "vit_to_transformers",
    "paligemma_to_transformers",
    # peft
    "LoraAdapter",
    "MergedCheckpoint",
    "merge_lora_weight",
    # OpenVLA / OpenVLA-OFT
    "openvla_vision_state_dicts",
    "openvla_tower_state_dict",
    "load_openvla_vision",
    "OFT_COMPONENTS",
    "read_oft_components",
    "openvla_state_dict",
    "save_openvla",
]
