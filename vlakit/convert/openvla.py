"""OpenVLA's published formats (Prismatic's key names, OpenVLA-OFT's run-folder files), read
and written.

- vision towers: ``vision_backbone.featurizer.*`` (DINOv2) and
  ``vision_backbone.fused_featurizer.*`` (SigLIP) hold timm keys, except LayerScale named
  ``ls{1,2}.scale_factor``; OpenVLA-OFT's FiLM-wrapped blocks (``blocks.{i}.block.*``,
  ``blocks.{i}.{scale,shift}.*``) are accepted too;
- OpenVLA-OFT's component files ``{kind}--{step}_checkpoint.pt`` (action head, proprio
  projector, noisy-action projector, FiLM vision backbone): torch pickles read with
  ``weights_only=True``, their DDP ``module.`` prefix removed
  ([read_oft_components][vlakit.convert.read_oft_components]);
- export: [openvla_state_dict][vlakit.convert.openvla_state_dict] and
  [save_openvla][vlakit.convert.save_openvla] write the published layout back.

Keys are renamed only by [`rename_keys`][vlakit.convert.rename_keys]: a key that matches no
rule raises [`CheckpointError`][vlakit.core.CheckpointError] naming it.
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlakit.convert._vit import vit_rules
from vlakit.convert.peft import merge_lora_weight
from vlakit.convert.rename import rename_keys
from vlakit.convert.transformers import _decoder_config, _decoder_state
from vlakit.core.checkpoint import CheckpointError, load_checked, read_torch_weights, strip_prefix

__all__ = [
    "openvla_vision_state_dicts",
    "openvla_tower_state_dict",
    "load_openvla_vision",
    "OFT_COMPONENTS",
    "read_oft_components",
    "openvla_state_dict",
    "save_openvla",
]


# -- vision towers ---------------------------------------------------------------------------

def _openvla_tower_to_vit(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    wb = r"(weight|bias)"
    oft_and_prismatic = [
        (r"blocks\.(\d+)\.block\.(.+)", r"blocks.\1.\2"),  # OFT FiLM wrapper
        (rf"blocks\.(\d+)\.(scale|shift)\.{wb}", r"blocks.\1.film.\2.\3"),
    ]
    renamed = rename_keys(state_dict, oft_and_prismatic, source, strict=False)
    layer_scale = [(r"blocks\.(\d+)\.ls([12])\.(?:scale_factor|gamma)", r"blocks.\1.ls\2.gamma")]
    renamed = rename_keys(renamed, layer_scale, source, strict=False)
    return rename_keys(renamed, vit_rules(attn_pool=True), source)


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


# -- OpenVLA-OFT's component files -----------------------------------------------------------

OFT_COMPONENTS = ("action_head", "proprio_projector", "noisy_action_projector",
                  "vision_backbone")
"""The kinds of ``{kind}--{step}_checkpoint.pt`` files an OpenVLA-OFT run folder holds."""


def _oft_files(path: Path, step: str | None) -> dict[str, Path]:
    """OFT's component files by kind, one step's."""
    found: dict[str, dict[str, Path]] = {}
    for file in sorted(path.glob("*--*_checkpoint.pt")):
        kind, _, rest = file.name.partition("--")
        found.setdefault(kind, {})[rest[: -len("_checkpoint.pt")]] = file
    unknown = sorted(set(found) - set(OFT_COMPONENTS))
    if unknown:
        raise CheckpointError(f"{path} holds OFT component files of unknown kind {unknown}")
    chosen = {}
    for kind, steps in found.items():
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{path} has no {kind}--{step}_checkpoint.pt (steps: "
                                      f"{sorted(steps)})")
            chosen[kind] = steps[step]
        elif len(steps) > 1:
            raise CheckpointError(f"{path} holds {kind} files for several steps "
                                  f"{sorted(steps)}: pass step=")
        else:
            chosen[kind] = next(iter(steps.values()))
    if "action_head" not in chosen:
        raise CheckpointError(
            f"{path} holds no action_head--*_checkpoint.pt: not an OpenVLA-OFT run directory "
            f"(load_openvla reads plain OpenVLA)"
        )
    return chosen


def _film_vision_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OFT's ``vision_backbone--*_checkpoint.pt`` (FiLM runs) as plain vision keys.

    OFT saves the whole FiLM-wrapped vision backbone of its peft model: every linear layer
    is a LoRA layer (``*.base_layer.{weight,bias}``, ``*.lora_A.<adapter>.weight``,
    ``*.lora_B.<adapter>.weight``), and evaluation keeps those adapters active with
    ``lora_alpha = min(r, 16)`` (its ``_apply_film_to_vla``). Each such layer is merged here:
    ``W = base + min(r, 16) / r * B A``. Keys get their ``vision_backbone.`` prefix.
    """
    out: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key if key.startswith("vision_backbone.") else f"vision_backbone.{key}"
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.[^.]+\.weight", key)
        if match:
            pairs.setdefault(match[1], {})[match[2]] = value
        else:
            out[key.replace(".base_layer.", ".")] = value
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"} or f"{module}.weight" not in out:
            raise CheckpointError(f"the FiLM vision file has an incomplete LoRA layer {module!r}")
        rank = pair["lora_A"].shape[0]
        out[f"{module}.weight"] = merge_lora_weight(out[f"{module}.weight"], pair["lora_A"],
                                                    pair["lora_B"], min(rank, 16) / rank)
    return out


def read_oft_components(
    path: str | os.PathLike, step: str | None = None
) -> dict[str, dict[str, Tensor]]:
    """An OpenVLA-OFT run folder's component files, by kind (see
    [OFT_COMPONENTS][vlakit.convert.OFT_COMPONENTS]), each a state dict without its DDP
    ``module.`` prefix.

    ``action_head`` is always there (else a [CheckpointError][vlakit.core.CheckpointError]:
    not an OFT run folder); the others when the run has them. ``vision_backbone`` (FiLM
    runs) comes back with OFT's LoRA layers merged as its evaluation runs them (``W + min(r,
    16) / r * B A``) and keys under ``vision_backbone.``, as in the base checkpoint.

    Args:
        path: the run folder.
        step: which ``--{step}_checkpoint.pt`` set to read, when there are several.
    """
    files = _oft_files(Path(path), step)
    parts = {kind: strip_prefix(read_torch_weights(file), "module.")
             for kind, file in files.items()}
    if "vision_backbone" in parts:
        parts["vision_backbone"] = _film_vision_state(parts["vision_backbone"])
    return parts


# -- export ----------------------------------------------------------------------------------

def openvla_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """An OpenVLA-layout assembly's weights under the published OpenVLA key names:
    ``vision_backbone.featurizer.*`` / ``fused_featurizer.*`` (timm names, LayerScale as
    Prismatic's ``scale_factor``, OFT FiLM as ``blocks.{i}.block.*`` and
    ``blocks.{i}.{scale,shift}.*``), ``projector.fc{i}.*``, ``language_model.model.*`` and
    ``language_model.lm_head.weight``. Towers truncated on load lack their unused last
    block and norms (the released files have them; vlakit's loaders accept both)."""
    encoders = list(getattr(model.encoder, "encoders", [model.encoder]))
    names = ("featurizer", "fused_featurizer")
    if len(encoders) > 2:
        raise ValueError(f"OpenVLA has one or two towers, this encoder has {len(encoders)}")
    out: dict[str, Tensor] = {}
    for name, tower in zip(names, encoders):
        film = any(".film." in k for k in tower.state_dict())
        for key, value in tower.state_dict().items():
            key = re.sub(r"\.ls([12])\.gamma$", r".ls\1.scale_factor", key)
            match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
            if film and match:
                i, rest = match.groups()
                key = (f"blocks.{i}.{rest[len('film.'):]}" if rest.startswith("film.")
                       else f"blocks.{i}.block.{rest}")
            out[f"vision_backbone.{name}.{key}"] = value
    for key, value in model.projector.state_dict().items():
        out[f"projector.{key}"] = value
    for key, value in _decoder_state(model.decoder).items():
        out[f"language_model.{key}"] = value
    if model.decoder.tied_embeddings:
        out["language_model.lm_head.weight"] = model.decoder.embed.weight
    return out


def save_openvla(
    model: nn.Module, path: str | os.PathLike, config: Mapping, max_shard_bytes: int = 5 << 30
) -> Path:
    """Write an OpenVLA-layout assembly as an OpenVLA directory: ``config.json`` (``config``,
    the original ``OpenVLAConfig`` fields, with ``text_config`` updated from the decoder)
    and safetensors shards with an index, keys as
    [openvla_state_dict][vlakit.convert.openvla_state_dict] gives them.
    [load_openvla][vlakit.models.load_openvla] reads it back exactly."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in openvla_state_dict(model).items()}
    _, text = _decoder_config(model.decoder)
    text_config = {**dict(config.get("text_config", {})), **{
        k: v for k, v in text.to_dict().items() if k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "head_dim",
            "max_position_embeddings", "tie_word_embeddings")}, "model_type": "llama"}
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for index, keys in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tied = {k: state[k].clone() if k == "language_model.lm_head.weight" else state[k]
                for k in keys}
        save_file(tied, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(
        {**dict(config), "model_type": "openvla", "text_config": text_config}, indent=1))
    return path
