"""Loading published checkpoint directories into vlakit assemblies in one call.

The architecture comes from the directory's ``config.json`` (no table of sizes kept by
hand), the model is built on the ``meta`` device, and the weights are assigned from the
memory-mapped safetensors ([load_into][vlakit.core.load_into]): nothing is
initialised and nothing is held twice.
"""

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from vlakit.convert import (
    HF_DECODER_RULES,
    CheckpointFiles,
    LoadReport,
    decoder_spec,
    load_into,
    rename_keys,
    siglip_vit_spec,
    transformers_siglip_to_vit,
)
from vlakit.core import CheckpointError, CheckpointView, building
from vlakit.decoders import transformer_decoder
from vlakit.model import VLA
from vlakit.models.paligemma import paligemma
from vlakit.projectors import LinearProjector
from vlakit.vision import vit

__all__ = ["load_paligemma", "load_openvla", "load_openvla_oft", "load_lightvla", "read_config"]


def read_config(path: str | os.PathLike) -> dict:
    """A checkpoint directory's ``config.json`` as a dict (a clear error if absent or bad)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{Path(path)} has no config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None


class _Renamed(Mapping):
    """vlakit key -> tensor, each read on access from the source mapping (or given)."""

    def __init__(self) -> None:
        self.sources: dict[str, tuple[Mapping, str]] = {}
        self.tensors: dict[str, Tensor] = {}

    def add(self, key: str, source: Mapping, source_key: str) -> None:
        self.sources[key] = (source, source_key)

    def __getitem__(self, key: str) -> Tensor:
        if key in self.tensors:
            return self.tensors[key]
        source, source_key = self.sources[key]
        return source[source_key]

    def __iter__(self) -> Iterator[str]:
        yield from self.tensors
        yield from self.sources

    def __len__(self) -> int:
        return len(self.tensors) + len(self.sources)

    def __contains__(self, key: object) -> bool:  # without reading (or merging) the tensor
        return key in self.tensors or key in self.sources

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.tensors:
            return tuple(self.tensors[key].shape)
        source, source_key = self.sources[key]
        return source.shape(source_key)

    def dtype(self, key: str) -> torch.dtype:
        if key in self.tensors:
            return self.tensors[key].dtype
        source, source_key = self.sources[key]
        return source.dtype(source_key)


def _split_paligemma_keys(keys) -> dict[str, dict[str, str]]:
    """Source keys by part (vision / projector / decoder / lm_head), part-relative, for the
    Hub layout (``vision_tower.vision_model.*``, ``language_model.model.*``), transformers
    5's saved layout (``vision_tower.*``) and its module names (``model.vision_tower.*``,
    ``model.language_model.*``, ``lm_head.weight``)."""
    parts: dict[str, dict[str, str]] = {"vision": {}, "projector": {}, "decoder": {},
                                         "lm_head": {}}
    for key in keys:
        k = key[len("model."):] if key.startswith("model.") else key
        if k.startswith("vision_tower."):
            inner = k[len("vision_tower."):]
            parts["vision"][inner.removeprefix("vision_model.")] = key
        elif k.startswith("multi_modal_projector."):
            parts["projector"][k[len("multi_modal_projector."):]] = key
        elif k in ("lm_head.weight", "language_model.lm_head.weight"):
            parts["lm_head"]["weight"] = key
        elif k.startswith("language_model."):
            parts["decoder"][k[len("language_model."):]] = key
        else:
            raise CheckpointError(
                f"PaliGemma checkpoint key {key!r} belongs to no part of the model (vision "
                f"tower, projector, language model): not a PaliGemma checkpoint?"
            )
    return parts


def load_paligemma(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_report: bool = False,
) -> VLA | tuple[VLA, LoadReport]:
    """A PaliGemma checkpoint directory (``config.json`` and ``model.safetensors`` or an
    index with shards, any of 224/448/896 px or a tiny one) as a vlakit
    [paligemma][vlakit.models.paligemma.paligemma] assembly, weights loaded strictly.

    Accepts the Hub layout (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
    ``language_model.model.*``, ``lm_head`` present or absent) and transformers 5.x's
    (``save_pretrained`` output and module names). Sizes, ids and the tied head come from
    ``config.json``. A stored ``lm_head.weight`` under a tied config must equal the
    embedding (else a ``CheckpointError``).

    Args:
        path: the directory.
        dtype: parameter dtype (default: the stored dtype of each tensor's model
            parameter, i.e. torch's default, float32); a bf16 checkpoint into float32 is
            converted and said in the report.
        device: where the weights go (default CPU).
        return_report: also return the [LoadReport][vlakit.core.LoadReport].
    """
    from transformers import PaliGemmaConfig

    raw = read_config(path)
    if raw.get("model_type") != "paligemma":
        raise CheckpointError(
            f"{Path(path) / 'config.json'} describes a {raw.get('model_type')!r} model, not "
            f"PaliGemma (model_type 'paligemma')"
        )
    config = PaliGemmaConfig.from_pretrained(path)
    text, vision = config.text_config, config.vision_config
    if text.model_type != "gemma":
        raise CheckpointError(
            f"this PaliGemma's language model is {text.model_type!r}; vlakit's loader builds "
            f"Gemma (PaliGemma 1) language models"
        )
    files = CheckpointFiles(path)
    parts = _split_paligemma_keys(files)
    with building(None, "meta"):
        encoder = vit(**siglip_vit_spec(vision))
        projector = LinearProjector(vision.hidden_size, vision.projection_dim, bias=True)
        decoder = transformer_decoder(**decoder_spec(text, "gemma", has_lm_head=True))
        model = paligemma(
            encoder=encoder, projector=projector, decoder=decoder,
            image_token_id=config.image_token_id, bos_id=text.bos_token_id,
            eos_id=text.eos_token_id,
        )
    state, skipped = _Renamed(), []
    vision_weights = {k: files[src] for k, src in parts["vision"].items()}  # q, k, v fused
    for key, tensor in transformers_siglip_to_vit(vision_weights).items():
        state.tensors[f"encoder.{key}"] = tensor
    del vision_weights  # the separate q, k, v: not kept beside the fused copies
    for key, src in parts["projector"].items():
        state.add(f"projector.{key}", files, src)
    names = rename_keys(parts["decoder"], HF_DECODER_RULES, source="PaliGemma language model")
    for key, src in names.items():
        state.add(f"decoder.{key}", files, src)
    head = parts["lm_head"].get("weight")
    if head is not None:
        if decoder.tied_embeddings:
            embed = names.get("embed.weight")
            if embed is None or not torch.equal(files[head], files[embed]):
                raise CheckpointError(
                    f"{head!r} differs from the embedding, but config.json ties them "
                    f"(tie_word_embeddings); the checkpoint and its config disagree"
                )
            skipped.append(head)
        else:
            state.add("decoder.lm_head.weight", files, head)
    with files:
        report = load_into(model, state, skipped=skipped, device=device, dtype=dtype,
                           source=f"PaliGemma checkpoint {Path(path)}")
    return (model, report) if return_report else model


# -- OpenVLA -----------------------------------------------------------------------------------

_OPENVLA_PREFIXES = ("vision_backbone.", "projector.", "language_model.")


def _timm_towers(raw: dict, path: Path) -> list[nn.Module]:
    """The vision towers the config names, built on ``meta`` through timm's own registry
    (as the released code builds them: ``pretrained=False, num_classes=0, img_size=...``)."""
    import timm

    ids = raw.get("timm_model_ids")
    sizes = raw.get("image_sizes")
    if not ids or not sizes or len(ids) != len(sizes):
        raise CheckpointError(
            f"{path / 'config.json'} needs 'timm_model_ids' and 'image_sizes' of the same "
            f"length (one per vision tower), got {ids!r} and {sizes!r}"
        )
    overrides = raw.get("timm_override_act_layers") or [None] * len(ids)
    towers = []
    for model_id, size, act in zip(ids, sizes, overrides):
        extra = {} if act is None else {"act_layer": act}  # CLIP: "quick_gelu"
        try:
            with torch.device("meta"):
                towers.append(timm.create_model(model_id, pretrained=False, num_classes=0,
                                                img_size=size, **extra))
        except RuntimeError as error:  # timm: unknown model
            raise CheckpointError(f"timm does not know the vision tower {model_id!r}: "
                                  f"{error}") from None
    return towers


def _preprocessor_stats(path: Path, count: int) -> list[tuple[tuple, tuple]] | None:
    """Per-tower (mean, std) from ``preprocessor_config.json`` (the released files hold
    bf16-rounded ImageNet statistics: take them from the directory, not from constants)."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    means, stds = data.get("means"), data.get("stds")
    if means is None or stds is None or len(means) != count or len(stds) != count:
        return None
    return [(tuple(m), tuple(s)) for m, s in zip(means, stds)]


def _openvla_projector(files: Mapping) -> nn.Module:
    """The projector from its stored shapes: Prismatic's ``fc1..fcN`` GELU MLPs (fused:
    three layers; plain: two) or a single ``projector.projector`` linear."""
    from vlakit.projectors import MLPProjector

    layers = sorted(int(k[len("projector.fc"):-len(".weight")]) for k in files
                    if k.startswith("projector.fc") and k.endswith(".weight"))
    if layers:
        if layers != list(range(1, len(layers) + 1)):
            raise CheckpointError(f"projector layers {layers} are not fc1..fc{len(layers)}")
        widths = [files.shape("projector.fc1.weight")[1]]
        widths += [files.shape(f"projector.fc{i}.weight")[0] for i in layers]
        return MLPProjector(widths)
    if "projector.projector.weight" in files:
        out, inp = files.shape("projector.projector.weight")
        return LinearProjector(inp, out, bias="projector.projector.bias" in files)
    raise CheckpointError("the checkpoint holds no projector weights (projector.fc1.* or "
                          "projector.projector.*)")


def load_openvla(
    path: str | os.PathLike,
    unnorm_key: str | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_report: bool = False,
) -> VLA | tuple[VLA, LoadReport]:
    """An OpenVLA checkpoint directory, as published, as a vlakit
    [openvla][vlakit.models.openvla.openvla] assembly with its weights.

    Reads ``config.json`` (``OpenVLAConfig``: ``timm_model_ids``, ``image_sizes``,
    ``text_config``, ``norm_stats``, ``n_action_bins``, ``pad_to_multiple_of``, ...),
    ``model.safetensors`` or ``model.safetensors.index.json`` with its shards, and
    ``dataset_statistics.json`` and ``preprocessor_config.json`` when present. Everything
    about the architecture comes from these files:

    - each vision tower from its ``timm_model_ids`` entry through timm's registry (on the
      meta device; any timm ViT id, including one a test registers), read into the own
      ViT returning the second-to-last block as OpenVLA does; the parts the forward never
      uses (each tower's last block and final norm, SigLIP's attention pool) are accepted,
      skipped and listed in the report. Mean and std come from ``preprocessor_config.json``;
    - the projector from its stored shapes (fused 3-layer or plain 2-layer GELU MLP);
    - the LLM from ``text_config`` through transformers' config class, so settings the
      released config leaves to transformers' defaults are what transformers would run:
      OpenVLA's Llama-2 runs ``rms_norm_eps`` 1e-6 (Llama-2 trained with 1e-5). Llama goes
      through vlakit's decoder; other causal LMs (Mistral, Phi-2) through ``HFDecoder``;
    - the action tokenizer from ``n_action_bins`` and the vocabulary (``vocab_size -
      pad_to_multiple_of``), the action dimension and the unnormaliser from the statistics
      (``dataset_statistics.json`` first, else ``config.json``'s ``norm_stats``) of
      ``unnorm_key`` (needed when there are several datasets).

    Args:
        path: the directory.
        unnorm_key: the dataset whose statistics unnormalise actions.
        adapter: a peft LoRA adapter folder ([LoraAdapter][vlakit.convert.LoraAdapter]),
            merged into the base weights as they are read (``W + alpha / r * B A``); an
            adapter for layers the checkpoint lacks, or a non-LoRA one, is refused.
        merge_adapter: ``False`` keeps the adapter as
            [LoRALinear][vlakit.core.LoRALinear] layers (base weights frozen, ``A`` and
            ``B`` loaded) to fine-tune further; [merge_lora][vlakit.core.merge_lora] folds
            them later.
        dtype: parameter dtype (default float32; the release is bf16, converted and
            reported).
        device: where the weights go (default CPU).
        return_report: also return the [LoadReport][vlakit.core.LoadReport].
    """
    return _load_prismatic(Path(path), unnorm_key, dtype, device, return_report, oft=None,
                           adapter=adapter, merge_adapter=merge_adapter)


def load_openvla_oft(
    path: str | os.PathLike,
    unnorm_key: str | None = None,
    *,
    chunk_size: int | None = None,
    attention: str = "bidirectional",
    step: str | None = None,
    pruner: nn.Module | None = None,
    predict_read: str | None = None,
    num_inference_steps: int | None = None,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_report: bool = False,
) -> VLA | tuple[VLA, LoadReport]:
    """An OpenVLA-OFT (or LightVLA) run directory as an
    [openvla_oft][vlakit.models.openvla_oft.openvla_oft] assembly with its weights.

    The directory is an OpenVLA directory (see [load_openvla][vlakit.models.load_openvla];
    FiLM weights inside the vision towers are found and loaded) plus OFT's component files,
    torch pickles read with ``weights_only=True`` and their DDP ``module.`` prefix removed:
    ``action_head--{step}_checkpoint.pt`` (L1 regression: ``model.*``; diffusion:
    ``noise_predictor.*``), ``proprio_projector--{step}_checkpoint.pt`` and, for diffusion,
    ``noisy_action_projector--{step}_checkpoint.pt``. What the model is follows from them:
    the head kind and its action dimension, MLP width and depth from the head's shapes, the
    proprio width from the proprio projector's (no file: no proprio token), FiLM from the
    tower keys. Views are whatever each batch brings.

    The chunk size is the one thing OFT keeps only as a constant chosen by platform: it is
    taken, as OFT does, from the dataset name (``libero*``: 8, ``aloha*``: 25, ``bridge*``:
    5), or given as ``chunk_size``. The same platform picks the action normalisation (ALOHA:
    min/max; else q01/q99); proprio is normalised in OFT's evaluation form.

    Args:
        path: the run directory.
        unnorm_key: the dataset whose statistics (un)normalise actions and proprio.
        chunk_size: actions per chunk, when the dataset name does not say.
        attention: ``"bidirectional"`` (OFT), ``"causal"`` or ``"parallel"``.
        step: which ``--{step}_checkpoint.pt`` files to read, when there are several.
        pruner: a token pruner (LightVLA: [load_lightvla][vlakit.models.load_lightvla]).
        predict_read: the head's read at prediction (see
            [SLOT_READS][vlakit.heads.SLOT_READS]).
        num_inference_steps: diffusion steps at prediction (default 50).
        adapter: a peft LoRA adapter folder merged into the base weights (OFT fine-tunes
            the backbone with LoRA r=32; its run folders usually hold the merged weights).
        merge_adapter: ``False`` keeps the adapter as LoRA layers (see ``load_openvla``).
        dtype: parameter dtype (default float32).
        device: where the weights go (default CPU).
        return_report: also return the [LoadReport][vlakit.core.LoadReport].
    """
    oft = dict(chunk_size=chunk_size, attention=attention, step=step, pruner=pruner,
               predict_read=predict_read, num_inference_steps=num_inference_steps)
    return _load_prismatic(Path(path), unnorm_key, dtype, device, return_report, oft=oft,
                           adapter=adapter, merge_adapter=merge_adapter)


def load_lightvla(
    path: str | os.PathLike, unnorm_key: str | None = None, **kwargs
) -> VLA | tuple[VLA, LoadReport]:
    """A LightVLA run directory: [load_openvla_oft][vlakit.models.load_openvla_oft] with a
    [LightVLAPruner][vlakit.pruners.LightVLAPruner] (it has no weights) and the released
    prediction read (``predict_read="next"``, see [lightvla_7b][vlakit.models.lightvla_7b]);
    ``kwargs`` as ``load_openvla_oft``'s."""
    from vlakit.pruners import LightVLAPruner

    kwargs.setdefault("pruner", LightVLAPruner())
    kwargs.setdefault("predict_read", "next")
    return load_openvla_oft(path, unnorm_key, **kwargs)


_PLATFORMS = (("libero", 8, "bounds_q99"), ("aloha", 25, "bounds"), ("bridge", 5, "bounds_q99"))


def _oft_files(path: Path, step: str | None) -> dict[str, Path]:
    """OFT's component files by kind (``action_head``, ``proprio_projector``,
    ``noisy_action_projector``), one step's."""
    found: dict[str, dict[str, Path]] = {}
    for file in sorted(path.glob("*--*_checkpoint.pt")):
        kind, _, rest = file.name.partition("--")
        found.setdefault(kind, {})[rest[: -len("_checkpoint.pt")]] = file
    unknown = sorted(set(found) - {"action_head", "proprio_projector", "noisy_action_projector",
                                   "vision_backbone"})
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


def _oft_head(head_state: dict, hidden: int, chunk_size: int, attention: str,
              options: dict, path: Path) -> nn.Module:
    from vlakit.models.openvla_oft import oft_head

    if any(k.startswith("noise_predictor.") for k in head_state):
        kind, prefix = "diffusion", "noise_predictor.mlp_resnet."
    elif any(k.startswith("model.") for k in head_state):
        kind, prefix = "l1", "model."
    else:
        raise CheckpointError(
            f"the action head in {path} has neither L1 regression keys (model.*) nor "
            f"diffusion keys (noise_predictor.*): e.g. {sorted(head_state)[:3]}"
        )
    out = head_state[f"{prefix}fc2.weight"].shape[0]
    mlp_dim, width = head_state[f"{prefix}fc1.weight"].shape
    if width != out * hidden:
        raise CheckpointError(
            f"the action head reads {width} features, but {out} actions x the LLM's width "
            f"{hidden} is {out * hidden}: the head belongs to another model"
        )
    blocks = len({k.split(".")[len(prefix.split("."))]
                  for k in head_state if k.startswith(f"{prefix}mlp_resnet_blocks.")})
    extra = {} if kind == "l1" else {"num_inference_steps": options["num_inference_steps"]}
    return oft_head(kind, hidden, chunk_size, out, attention, mlp_dim=mlp_dim,
                    num_blocks=blocks, predict_read=options["predict_read"], **extra)


class _Overlay(CheckpointView):
    """The base checkpoint with its ``vision_backbone.*`` keys replaced by OFT's FiLM file."""

    def __init__(self, base: Mapping, vision: dict[str, Tensor]) -> None:
        super().__init__(base)
        self.vision = vision
        self.keys_ = [k for k in base if not k.startswith("vision_backbone.")] + list(vision)

    def __getitem__(self, key: str) -> Tensor:
        return self.vision[key] if key in self.vision else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def __contains__(self, key: object) -> bool:
        return key in self.vision or (key in self.base and not str(key).startswith(
            "vision_backbone."))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.vision[key].shape) if key in self.vision else super().shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.vision[key].dtype if key in self.vision else super().dtype(key)


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
        scale = min(rank, 16) / rank
        base = out[f"{module}.weight"]
        delta = pair["lora_B"].float() @ pair["lora_A"].float()
        out[f"{module}.weight"] = (base.float() + scale * delta).to(base.dtype)
    return out


def _load_prismatic(path: Path, unnorm_key, dtype, device, return_report, oft: dict | None,
                    adapter=None, merge_adapter: bool = True):
    from transformers import AutoConfig

    from vlakit.actions import ActionNormalizer, ActionTokenizer
    from vlakit.actions.normalizer import load_norm_stats
    from vlakit.convert import (
        openvla_tower_state_dict,
        read_torch_weights,
        strip_prefix,
        timm_vit_spec,
    )
    from vlakit.decoders import HFDecoder
    from vlakit.models.openvla import openvla
    from vlakit.models.openvla_oft import openvla_oft
    from vlakit.projectors import ProprioProjector
    from vlakit.vision import FusedEncoder, PreprocessConfig

    raw = read_config(path)
    if raw.get("model_type") != "openvla":
        raise CheckpointError(
            f"{path / 'config.json'} describes a {raw.get('model_type')!r} model, not "
            f"OpenVLA (model_type 'openvla')"
        )
    files = CheckpointFiles(path)
    lora_adapter = None
    if adapter is not None:
        from vlakit.convert import LoraAdapter, MergedCheckpoint

        lora_adapter = LoraAdapter(adapter)
        merged = MergedCheckpoint(files, lora_adapter)  # checks every target first
        files = merged if merge_adapter else files
    stray = [k for k in files if not k.startswith(_OPENVLA_PREFIXES)]
    if stray:
        raise CheckpointError(
            f"OpenVLA checkpoint key {stray[0]!r} is outside {list(_OPENVLA_PREFIXES)} "
            f"({len(stray)} such keys)"
        )
    towers = _timm_towers(raw, path)
    stats = _preprocessor_stats(path, len(towers))
    text = dict(raw["text_config"])
    text_type = text.pop("model_type", "llama")
    llm_config = AutoConfig.for_model(text_type, **text)
    norm_stats = None
    if (path / "dataset_statistics.json").is_file():
        norm_stats = load_norm_stats(path / "dataset_statistics.json")
    elif raw.get("norm_stats"):
        norm_stats = raw["norm_stats"]
    if norm_stats and unnorm_key is None and len(norm_stats) > 1:
        raise ValueError(
            f"this OpenVLA was trained on {len(norm_stats)} datasets: pass unnorm_key, one of "
            f"{sorted(norm_stats)}"
        )
    dataset = unnorm_key or (next(iter(norm_stats)) if norm_stats else "")
    platform = next((p for p in _PLATFORMS if dataset.lower().startswith(p[0])), None)
    mode = platform[2] if platform and oft is not None else "bounds_q99"
    normalizer = proprio_normalizer = None
    if norm_stats:
        normalizer = ActionNormalizer.from_stats(norm_stats, unnorm_key, mode=mode)
    extra_state: dict[str, Tensor] = {}
    if oft is not None:
        parts = {kind: strip_prefix(read_torch_weights(file), "module.")
                 for kind, file in _oft_files(path, oft["step"]).items()}
        if "vision_backbone" in parts:  # FiLM runs keep their vision backbone apart
            files = _Overlay(files, _film_vision_state(parts.pop("vision_backbone")))
        chunk = oft["chunk_size"] or (platform[1] if platform else None)
        if chunk is None:
            raise ValueError(
                f"the chunk size of dataset {dataset!r} is not known (OFT keeps it as a "
                f"platform constant: libero 8, aloha 25, bridge 5): pass chunk_size="
            )
        proprio = parts.get("proprio_projector")
        if proprio is not None and norm_stats and "proprio" in norm_stats[dataset]:
            proprio_normalizer = ActionNormalizer.from_stats(
                norm_stats, unnorm_key, mode=mode, key="proprio", form="oft_eval")
        head_state = parts["action_head"]
        if "noisy_action_projector" in parts:
            head_state.update({f"noisy_action_projector.{k}": v
                               for k, v in parts["noisy_action_projector"].items()})
        extra_state.update({f"head.{k}": v for k, v in head_state.items()})
        if proprio is not None:
            extra_state.update({f"proprio_projector.{k}": v for k, v in proprio.items()})
    # OpenVLAConfig pads the vocabulary to a multiple of 64 unless its config says otherwise
    film = any(".scale.weight" in k for k in files if k.startswith("vision_backbone."))
    vocab_end = llm_config.vocab_size - int(raw.get("pad_to_multiple_of", 64) or 0)

    with building(None, "meta"):
        vits = []
        for i, tower in enumerate(towers):
            spec = timm_vit_spec(tower, output_layer=-2)
            if stats is not None:
                base = spec["preprocessing"]
                spec["preprocessing"] = PreprocessConfig(
                    size=base.size, mean=stats[i][0], std=stats[i][1],
                    interpolation=base.interpolation, antialias=base.antialias)
            vits.append(vit(**spec).truncate())
        encoder = vits[0] if len(vits) == 1 else FusedEncoder(vits)
        if text_type == "llama":
            decoder = transformer_decoder(**decoder_spec(llm_config, "llama", has_lm_head=True))
        else:
            from transformers import AutoModelForCausalLM

            decoder = HFDecoder(AutoModelForCausalLM.from_config(llm_config))
        if film:
            encoder.add_film(decoder.dim)
        projector = _openvla_projector(files)
        if oft is None:
            model = openvla(
                encoder=encoder, projector=projector, decoder=decoder,
                action_tokenizer=ActionTokenizer(
                    vocab_end=vocab_end, action_dim=normalizer.dim if normalizer else 7,
                    num_bins=int(raw.get("n_action_bins", 256))),
                action_normalizer=normalizer,
                bos_id=llm_config.bos_token_id, eos_id=llm_config.eos_token_id,
            )
        else:
            proprio_projector = None
            if proprio is not None:
                width, proprio_dim = proprio["fc1.weight"].shape
                proprio_projector = ProprioProjector(proprio_dim, width)
            model = openvla_oft(
                encoder=encoder, projector=projector, decoder=decoder,
                head=_oft_head(head_state, decoder.dim, chunk, oft["attention"], oft, path),
                proprio_projector=proprio_projector, attention=oft["attention"],
                action_normalizer=normalizer, proprio_normalizer=proprio_normalizer,
                bos_id=llm_config.bos_token_id, eos_id=llm_config.eos_token_id,
                pruner=oft["pruner"],
            )

    state, skipped = _Renamed(), []
    for key, value in model.state_dict().items():  # from the statistics, not the weights
        if key.startswith(("action_normalizer.", "proprio_normalizer.")):
            state.tensors[key] = value
    state.tensors.update(extra_state)
    vision = {k: files[k] for k in files if k.startswith("vision_backbone.")}
    others = [k for k in vision if not k.startswith(("vision_backbone.featurizer.",
                                                      "vision_backbone.fused_featurizer."))]
    if others:
        raise CheckpointError(f"OpenVLA vision key {others[0]!r} belongs to no tower")
    names = ("featurizer", "fused_featurizer")[: len(vits)]
    tower_states = [openvla_tower_state_dict(vision, name) for name in names]
    source_of: dict[str, str] = {}  # vlakit key -> checkpoint key
    for index, name in enumerate(names):
        prefix = "encoder." if len(vits) == 1 else f"encoder.encoders.{index}."
        keys = {k: k for k in vision}
        for key, src in openvla_tower_state_dict(keys, name).items():
            source_of[f"{prefix}{key}"] = src
    for index, (tower, weights) in enumerate(zip(vits, tower_states)):
        prefix = "encoder." if len(vits) == 1 else f"encoder.encoders.{index}."
        dropped = tuple(tower.dropped_prefixes)
        for key, tensor in weights.items():
            if dropped and key.startswith(dropped):
                skipped.append(f"{prefix}{key}")
            else:
                state.tensors[f"{prefix}{key}"] = tensor
    for key in files:
        if key.startswith("projector."):
            state.add(key, files, key)
    language = {k[len("language_model."):]: k for k in files if k.startswith("language_model.")}
    if isinstance(decoder, HFDecoder):
        for key, src in language.items():
            state.add(f"decoder.model.{key}", files, src)
    else:
        names = rename_keys(language, HF_DECODER_RULES, source="OpenVLA language model")
        for key, src in names.items():
            state.add(f"decoder.{key}", files, src)
    source_of.update({key: src for key, (_, src) in state.sources.items()})
    with files:
        report = load_into(model, state, skipped=skipped, device=device, dtype=dtype,
                           source=f"OpenVLA checkpoint {path}")
    if lora_adapter is not None and not merge_adapter:
        _keep_lora(model, lora_adapter, source_of)
    if isinstance(decoder, HFDecoder):
        _materialise_buffers(decoder, device or "cpu")
    return (model, report) if return_report else model


def _materialise_buffers(module: nn.Module, device) -> None:
    """A transformers model built on ``meta`` keeps its computed, non-persistent buffers
    (RoPE's ``inv_freq``) there after its weights are assigned; rebuild each such module
    from its config on ``device`` and take its buffers."""
    for name, sub in module.named_modules():
        meta = [k for k, b in sub._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        config = getattr(sub, "config", None)
        if config is None:
            raise CheckpointError(f"buffer {name}.{meta[0]} is still on the meta device and "
                                  f"{type(sub).__name__} has no config to recompute it from")
        with torch.device(device):
            fresh = type(sub)(config=config)
        for key in meta:
            sub._buffers[key] = fresh._buffers[key]
        for attr, value in vars(fresh).items():  # e.g. original_inv_freq, a plain attribute
            if isinstance(value, Tensor) and getattr(sub, attr, None) is not None and \
                    getattr(sub, attr).is_meta:
                setattr(sub, attr, value)


def _keep_lora(model: nn.Module, adapter, source_of: dict[str, str]) -> None:
    """Replace each adapted linear layer by a LoRALinear holding its loaded weight and the
    adapter's A and B."""
    from vlakit.core import LoRALinear

    target_of = {src: key for key, src in source_of.items()}
    for target, pair in adapter.pairs.items():
        key = target_of.get(target)
        if key is None or not key.endswith(".weight"):
            raise CheckpointError(f"the adapter's {target!r} maps to no linear layer of the model")
        name = key[: -len(".weight")]
        layer = model.get_submodule(name)
        if type(layer) is not nn.Linear:
            raise CheckpointError(f"the adapter adapts {name!r}, a {type(layer).__name__}, not "
                                  f"a linear layer")
        rank = pair["lora_A"].shape[0]
        adapted = LoRALinear(layer.in_features, layer.out_features, rank,
                             alpha=adapter.scale(target) * rank, bias=layer.bias is not None)
        adapted = adapted.to(device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            adapted.weight.copy_(layer.weight)
            if layer.bias is not None:
                adapted.bias.copy_(layer.bias)
            adapted.lora_A.weight.copy_(pair["lora_A"])
            adapted.lora_B.weight.copy_(pair["lora_B"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, adapted)
