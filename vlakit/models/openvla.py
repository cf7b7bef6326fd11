"""OpenVLA-7B: fused DINOv2 + SigLIP at the second-to-last block, MLP projector, Llama-2-7B,
actions as 256-bin tokens.

The family file: the builders ([openvla_7b][vlakit.models.openvla_7b], the component
builder [openvla][vlakit.models.openvla.openvla]) and the loader of a published OpenVLA
(Prismatic) directory, [load_openvla][vlakit.models.load_openvla]: its reader (config, timm
towers, LLM config, statistics) and its weight map, which OpenVLA-OFT's loader
([openvla_oft][vlakit.models.openvla_oft]) extends.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.actions.normalizer import load_norm_stats
from vlakit.bundle import ObservationKeys, PolicyBundle
from vlakit.convert.openvla import openvla_tower_state_dict
from vlakit.convert.peft import LoraAdapter, MergedCheckpoint
from vlakit.convert.rename import rename_keys
from vlakit.convert.timm import timm_vit_spec
from vlakit.convert.transformers import HF_DECODER_RULES, decoder_spec
from vlakit.core import (
    CausalMask,
    CheckpointError,
    CheckpointFiles,
    CheckpointView,
    LinearFactory,
    LoadReport,
    LoRALinear,
    building,
    load_into,
)
from vlakit.decoders import HFDecoder, llama2_7b, transformer_decoder
from vlakit.heads import DiscreteActionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.model import VLA
from vlakit.models._common import policy_bundle, read_config
from vlakit.processors import OpenVLAProcessor
from vlakit.projectors import LinearProjector, MLPProjector
from vlakit.vision import (
    FusedEncoder,
    PreprocessConfig,
    dinov2_large_reg4,
    siglip_so400m,
    vit,
)

__all__ = ["openvla", "openvla_7b", "load_openvla", "openvla_policy"]


def openvla(
    *,
    encoder: nn.Module,
    projector: nn.Module,
    decoder: nn.Module,
    action_tokenizer: ActionTokenizer,
    action_normalizer: ActionNormalizer | None = None,
    chunk_size: int = 1,
    bos_id: int = 1,
    eos_id: int = 2,
    num_views: int | None = None,
) -> VLA:
    """Component builder: an OpenVLA-style model from any encoder, projector and decoder.

    ``<s>``, image tokens, prompt, action tokens, ``</s>`` under a causal mask; actions are
    generated greedily as tokens ([`DiscreteActionHead`][vlakit.heads.DiscreteActionHead]).
    ``num_views``: camera views every batch must bring (OpenVLA reads one; ``None``: any).
    """
    return VLA(
        encoder=encoder,
        projector=projector,
        interleaver=PrefixInterleaver(bos_id=bos_id, eos_id=eos_id),
        decoder=decoder,
        mask_policy=CausalMask(),
        head=DiscreteActionHead(action_tokenizer, chunk_size=chunk_size),
        action_normalizer=action_normalizer,
        num_views=num_views,
    )


def openvla_7b(
    img_size: int = 224,
    vocab_size: int = 32064,
    norm_eps: float | None = None,
    encoder_output_layer: int = -2,
    action_dim: int = 7,
    action_vocab_end: int = 32000,
    action_normalizer: ActionNormalizer | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    linear: LinearFactory = nn.Linear,
) -> VLA:
    """OpenVLA-7B: 7,541,237,184 parameters, the same state-dict shapes as the release.

    Keeps every parameter of the released checkpoint, including the parts the forward never
    uses (the last block and final norm of both towers, SigLIP's pooling head); call
    ``model.encoder.encoders[i].truncate()`` to drop them after loading.

    Args:
        img_size: image size of both towers (224: 256 image tokens per view).
        vocab_size: Llama vocabulary incl. the pad token, padded to a multiple of 64.
        norm_eps: the Llama's RMSNorm epsilon; default 1e-6, what the released OpenVLA
            runs with (its saved config falls back to transformers' default, although
            Llama-2 was trained with 1e-5; the two move logits by ~2e-4).
        encoder_output_layer: block both towers return (second-to-last).
        action_dim: action dimensions per step.
        action_vocab_end: one past the last action-token id (the tokenizer's base vocab).
        action_normalizer: unnormalises predictions (``ActionNormalizer.from_stats(
            norm_stats, unnorm_key)``); ``None`` returns normalised actions in [-1, 1].
        dtype: parameter dtype, built directly (no fp32 copy first).
        device: where to build (``"meta"`` for counting).
        linear: factory for every linear layer of both towers and the Llama (LoRA,
            quantised, FP8 linears); the projector and the LM head stay ``nn.Linear``.
    """
    with building(dtype, device):
        encoder, projector, decoder = _openvla_7b_parts(
            img_size, vocab_size, norm_eps, encoder_output_layer, linear
        )
        return openvla(
            encoder=encoder,
            projector=projector,
            decoder=decoder,
            action_tokenizer=ActionTokenizer(vocab_end=action_vocab_end, action_dim=action_dim),
            action_normalizer=action_normalizer,
        )


def _openvla_7b_parts(
    img_size: int,
    vocab_size: int,
    norm_eps: float | None,
    encoder_output_layer: int,
    linear: LinearFactory,
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """OpenVLA-7B's fused towers, projector and Llama (inside ``building``)."""
    encoder = FusedEncoder([
        dinov2_large_reg4(img_size, output_layer=encoder_output_layer, linear=linear),
        siglip_so400m(img_size, map_head=True, gelu_approximate="none",
                      output_layer=encoder_output_layer, linear=linear),
    ])
    decoder = llama2_7b(vocab_size, 1e-6 if norm_eps is None else norm_eps, linear=linear)
    return encoder, MLPProjector([2176, 8704, 4096, 4096]), decoder


# -- the published directory -----------------------------------------------------------------

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
      ``unnorm_key`` (needed when there are several datasets);
    - one camera view: the model is built with ``num_views=1`` (a batch with more is
      refused), as OpenVLA reads one image.

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
    source = _read_prismatic(Path(path), unnorm_key, adapter, merge_adapter)
    normalizer = source.normalizer("bounds_q99")
    # OpenVLAConfig pads the vocabulary to a multiple of 64 unless its config says otherwise
    vocab_end = source.llm_config.vocab_size - int(source.raw.get("pad_to_multiple_of", 64) or 0)
    with building(None, "meta"):
        encoder, projector, decoder = _prismatic_blocks(source)
        model = openvla(
            encoder=encoder, projector=projector, decoder=decoder,
            action_tokenizer=ActionTokenizer(
                vocab_end=vocab_end, action_dim=normalizer.dim if normalizer else 7,
                num_bins=int(source.raw.get("n_action_bins", 256))),
            action_normalizer=normalizer,
            bos_id=source.llm_config.bos_token_id, eos_id=source.llm_config.eos_token_id,
            num_views=1,
        )
    report = _load_prismatic(model, source, dtype=dtype, device=device)
    return (model, report) if return_report else model


def openvla_policy(
    path: str | os.PathLike,
    unnorm_key: str | None = None,
    *,
    keys: ObservationKeys | None = None,
    tokenizer: Any = None,
    **load_options: Any,
) -> PolicyBundle:
    """An OpenVLA directory as a [PolicyBundle][vlakit.bundle.PolicyBundle]: the model from
    [load_openvla][vlakit.models.load_openvla], the directory's tokenizer and an
    [OpenVLAProcessor][vlakit.processors.OpenVLAProcessor] that does what OpenVLA's
    training data transform and evaluation scripts do (the instruction lower-cased, the
    ``"▁"`` piece appended after ``Out:``). One camera, no state.

    Args:
        path: the directory (it must hold the tokenizer's files, as OpenVLA's
            releases do, unless ``tokenizer`` is given).
        unnorm_key: as the loader's.
        keys: the observation keys the policy reads (default
            [ObservationKeys.for_model][vlakit.bundle.ObservationKeys.for_model]: openpi's
            LIBERO keys, as many cameras as the model reads).
        tokenizer: the tokenizer, instead of the one in ``path``.
        **load_options: the loader's other keyword arguments (not ``return_report``).
    """
    model = load_openvla(path, unnorm_key, **load_options)
    return policy_bundle(model, path, OpenVLAProcessor, keys, tokenizer, lowercase=True)


_OPENVLA_PREFIXES = ("vision_backbone.", "projector.", "language_model.")
_TOWER_NAMES = ("featurizer", "fused_featurizer")


@dataclasses.dataclass
class _Prismatic:
    """An OpenVLA (Prismatic) directory, read: what builds the backbone, what it loads.

    ``files`` is the lazy weight mapping (with the adapter merged when asked; OpenVLA-OFT
    overlays its FiLM vision file on it); ``towers`` the timm towers on ``meta``;
    ``norm_stats`` and ``dataset`` the statistics chosen for ``unnorm_key``."""

    path: Path
    raw: dict
    files: Mapping
    adapter: LoraAdapter | None
    merge_adapter: bool
    towers: list[nn.Module]
    preprocessing: list[tuple[tuple, tuple]] | None
    llm_config: Any
    norm_stats: dict | None
    unnorm_key: str | None
    dataset: str

    def normalizer(self, mode: str, **kwargs) -> ActionNormalizer | None:
        """The statistics' normaliser for ``unnorm_key`` (``None`` without statistics)."""
        if not self.norm_stats:
            return None
        return ActionNormalizer.from_stats(self.norm_stats, self.unnorm_key, mode=mode, **kwargs)


def _read_prismatic(path: Path, unnorm_key: str | None, adapter,
                    merge_adapter: bool) -> _Prismatic:
    """Read an OpenVLA directory: config, weights (and adapter), towers, LLM, statistics."""
    from transformers import AutoConfig

    raw = read_config(path, "openvla", "OpenVLA")
    files, lora_adapter = _open_weights(path, adapter, merge_adapter)
    towers = _timm_towers(raw, path)
    preprocessing = _preprocessor_stats(path, len(towers))
    text = dict(raw["text_config"])
    llm_config = AutoConfig.for_model(text.pop("model_type", "llama"), **text)
    norm_stats = _norm_stats(path, raw, unnorm_key)
    dataset = unnorm_key or (next(iter(norm_stats)) if norm_stats else "")
    return _Prismatic(path, raw, files, lora_adapter, merge_adapter, towers, preprocessing,
                     llm_config, norm_stats, unnorm_key, dataset)


def _open_weights(path: Path, adapter, merge_adapter: bool) -> tuple[Mapping, Any]:
    """The directory's safetensors (merged with ``adapter`` if asked), OpenVLA's keys only."""
    files: Mapping = CheckpointFiles(path)
    lora_adapter = None
    if adapter is not None:
        lora_adapter = LoraAdapter(adapter)
        merged = MergedCheckpoint(files, lora_adapter)  # checks every target first
        files = merged if merge_adapter else files
    stray = [k for k in files if not k.startswith(_OPENVLA_PREFIXES)]
    if stray:
        raise CheckpointError(
            f"OpenVLA checkpoint key {stray[0]!r} is outside {list(_OPENVLA_PREFIXES)} "
            f"({len(stray)} such keys)"
        )
    return files, lora_adapter


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


def _norm_stats(path: Path, raw: dict, unnorm_key: str | None) -> dict | None:
    """``dataset_statistics.json`` (a fine-tuned run's) if present, else the config's
    ``norm_stats``; several datasets need ``unnorm_key``."""
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
    return norm_stats


def _prismatic_blocks(source: _Prismatic) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The encoder (FiLM if the weights have it), projector and decoder the directory
    describes (inside ``building(None, "meta")``)."""
    vits = []
    for i, tower in enumerate(source.towers):
        spec = timm_vit_spec(tower, output_layer=-2)
        if source.preprocessing is not None:
            base = spec["preprocessing"]
            mean, std = source.preprocessing[i]
            spec["preprocessing"] = PreprocessConfig(
                size=base.size, mean=mean, std=std,
                interpolation=base.interpolation, antialias=base.antialias)
        vits.append(vit(**spec).truncate())
    encoder = vits[0] if len(vits) == 1 else FusedEncoder(vits)
    config = source.llm_config
    if config.model_type == "llama":
        decoder = transformer_decoder(**decoder_spec(config, "llama", has_lm_head=True))
    else:
        from transformers import AutoModelForCausalLM

        decoder = HFDecoder(AutoModelForCausalLM.from_config(config))
    files = source.files
    if any(".scale.weight" in k for k in files if k.startswith("vision_backbone.")):  # FiLM
        encoder.add_film(decoder.dim)
    return encoder, _openvla_projector(files), decoder


def _openvla_projector(files: Mapping) -> nn.Module:
    """The projector from its stored shapes: Prismatic's ``fc1..fcN`` GELU MLPs (fused:
    three layers; plain: two) or a single ``projector.projector`` linear."""
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


def _load_prismatic(model: VLA, source: _Prismatic, extra: Mapping[str, Tensor] | None = None,
                    *, dtype=None, device=None) -> LoadReport:
    """Load the directory (and ``extra`` tensors under vlakit keys: OFT's head and
    proprio projector) into ``model`` strictly; then keep the adapter as LoRA layers if
    asked, and give a transformers decoder its computed buffers."""
    state, skipped = _prismatic_weights(model, source, extra or {})
    with state:
        report = load_into(model, state, skipped=skipped, device=device, dtype=dtype,
                           source=f"OpenVLA checkpoint {source.path}")
    if source.adapter is not None and not source.merge_adapter:
        _keep_lora(model, source.adapter, _source_keys(model, source, state))
    if isinstance(model.decoder, HFDecoder):
        _materialise_buffers(model.decoder, device or "cpu")
    return report


def _tower_prefixes(model: VLA) -> list[tuple[str, str, nn.Module]]:
    """(checkpoint tower name, vlakit prefix, tower) for each vision tower."""
    towers = list(getattr(model.encoder, "encoders", [model.encoder]))
    if len(towers) == 1:
        return [(_TOWER_NAMES[0], "encoder.", towers[0])]
    return [(name, f"encoder.encoders.{i}.", tower)
            for i, (name, tower) in enumerate(zip(_TOWER_NAMES, towers))]


def _prismatic_weights(model: VLA, source: _Prismatic,
                       extra: Mapping[str, Tensor]) -> tuple[CheckpointView, list[str]]:
    """The weight map: vlakit key -> stored tensor (vision towers renamed from Prismatic's
    keys and read now; projector and LLM read as they load; statistics from the model's
    own normalisers), and the stored tower parts the truncated towers skip."""
    files = source.files
    tensors = {key: value for key, value in model.state_dict().items()  # from the statistics
               if key.startswith(("action_normalizer.", "proprio_normalizer."))}
    tensors.update(extra)
    vision = {k: files[k] for k in files if k.startswith("vision_backbone.")}
    others = [k for k in vision if not k.startswith(("vision_backbone.featurizer.",
                                                      "vision_backbone.fused_featurizer."))]
    if others:
        raise CheckpointError(f"OpenVLA vision key {others[0]!r} belongs to no tower")
    skipped = []
    for name, prefix, tower in _tower_prefixes(model):
        dropped = tuple(tower.dropped_prefixes)
        for key, tensor in openvla_tower_state_dict(vision, name).items():
            if dropped and key.startswith(dropped):
                skipped.append(f"{prefix}{key}")
            else:
                tensors[f"{prefix}{key}"] = tensor
    names = {key: key for key in files if key.startswith("projector.")}
    language = {k[len("language_model."):]: k for k in files if k.startswith("language_model.")}
    if isinstance(model.decoder, HFDecoder):
        names.update({f"decoder.model.{key}": src for key, src in language.items()})
    else:
        renamed = rename_keys(language, HF_DECODER_RULES, source="OpenVLA language model")
        names.update({f"decoder.{key}": src for key, src in renamed.items()})
    return CheckpointView(files, names=names, tensors=tensors), skipped


def _source_keys(model: VLA, source: _Prismatic, state: CheckpointView) -> dict[str, str]:
    """vlakit key -> checkpoint key, for every weight read from the checkpoint."""
    vision = [k for k in source.files if k.startswith("vision_backbone.")]
    source_of = {}
    for name, prefix, _ in _tower_prefixes(model):
        for key, src in openvla_tower_state_dict({k: k for k in vision}, name).items():
            source_of[f"{prefix}{key}"] = src
    source_of.update(state.names)
    return source_of


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


def _keep_lora(model: nn.Module, adapter: LoraAdapter, source_of: dict[str, str]) -> None:
    """Replace each adapted linear layer by a LoRALinear holding its loaded weight and the
    adapter's A and B."""
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
