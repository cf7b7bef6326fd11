"""Export back: vlakit blocks as transformers models (their own format, ``save_pretrained``
writes it) and OpenVLA assemblies in the published OpenVLA key layout.

Each export is the inverse of a loader in this package, and the round trips vlakit ->
transformers -> vlakit are exact (tested).
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from vlakit.core.checkpoint import CheckpointError
from vlakit.decoders import TransformerDecoder

__all__ = [
    "decoder_to_transformers",
    "vit_to_transformers",
    "paligemma_to_transformers",
    "openvla_state_dict",
    "save_openvla",
]

_ACT_NAMES = {("GELU", "tanh"): "gelu_pytorch_tanh", ("GELU", "none"): "gelu", ("SiLU", None):
              "silu"}


def _activation_name(act: nn.Module) -> str:
    key = (type(act).__name__, getattr(act, "approximate", None))
    if key not in _ACT_NAMES:
        raise ValueError(f"no transformers activation for {act!r}")
    return _ACT_NAMES[key]


def _decoder_family(decoder: TransformerDecoder) -> str:
    norm = decoder.layers[0].attn_norm
    gemma = bool(getattr(norm, "unit_offset", False))
    if gemma != bool(getattr(decoder.embed, "scale_by_sqrt_dim", False)):
        raise ValueError(
            "this decoder mixes Llama and Gemma conventions (RMSNorm unit offset without the "
            "sqrt(d) embedding scale, or the reverse); transformers has no such model"
        )
    return "gemma" if gemma else "llama"


def _decoder_config(decoder: TransformerDecoder):
    from transformers import GemmaConfig, LlamaConfig

    if not isinstance(decoder, TransformerDecoder):
        raise TypeError(f"expected vlakit's TransformerDecoder, got {type(decoder).__name__}")
    family = _decoder_family(decoder)
    layer = decoder.layers[0]
    attn, mlp = layer.attn, layer.mlp
    if attn.q_proj.bias is not None or mlp.gate_proj.bias is not None or attn.scale is not None:
        raise ValueError("transformers' Llama and Gemma have no projection biases and the "
                         "default attention scale; this decoder differs")
    fields = dict(
        vocab_size=decoder.vocab_size, hidden_size=decoder.dim,
        intermediate_size=mlp.gate_proj.out_features, num_hidden_layers=decoder.num_layers,
        num_attention_heads=attn.num_heads, num_key_value_heads=attn.num_kv_heads,
        head_dim=attn.head_dim, rms_norm_eps=layer.attn_norm.eps,
        max_position_embeddings=decoder.max_seq_len,
        tie_word_embeddings=decoder.tied_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(decoder.rope.base)},
        hidden_act=_activation_name(mlp.activation),
    )
    if family == "gemma":
        return "gemma", GemmaConfig(**fields)
    return "llama", LlamaConfig(**fields)


def _decoder_state(decoder: TransformerDecoder, prefix: str = "model.") -> dict[str, Tensor]:
    rules = [
        (r"embed\.weight", f"{prefix}embed_tokens.weight"),
        (r"layers\.(\d+)\.attn\.([qkvo])_proj\.weight",
         rf"{prefix}layers.\1.self_attn.\2_proj.weight"),
        (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight",
         rf"{prefix}layers.\1.mlp.\2_proj.weight"),
        (r"layers\.(\d+)\.attn_norm\.weight", rf"{prefix}layers.\1.input_layernorm.weight"),
        (r"layers\.(\d+)\.mlp_norm\.weight",
         rf"{prefix}layers.\1.post_attention_layernorm.weight"),
        (r"norm\.weight", f"{prefix}norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    ]
    out = {}
    for key, value in decoder.state_dict().items():
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise CheckpointError(f"decoder key {key!r} has no transformers counterpart")
    return out


def _load_exact(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{what}: missing {missing[:5]}, unexpected "
                              f"{result.unexpected_keys[:5]}")


def decoder_to_transformers(decoder: TransformerDecoder) -> nn.Module:
    """vlakit's decoder as transformers' ``LlamaForCausalLM`` or ``GemmaForCausalLM`` (by
    its conventions: Gemma's unit-offset RMSNorm and sqrt(d) embedding scale), weights
    copied, on the decoder's dtype (CPU). ``.save_pretrained(dir)`` then writes
    transformers' own format. Inverse of
    [decoder_from_transformers][vlakit.convert.decoder_from_transformers]."""
    from transformers import GemmaForCausalLM, LlamaForCausalLM

    family, config = _decoder_config(decoder)
    dtype = decoder.embed.weight.dtype
    model = (GemmaForCausalLM if family == "gemma" else LlamaForCausalLM)(config).to(dtype)
    _load_exact(model, _decoder_state(decoder), "decoder export")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def vit_to_transformers(vit: nn.Module) -> nn.Module:
    """A SigLIP-shaped own [ViT][vlakit.vision.ViT] (no class or register tokens, no
    LayerScale, final norm, optional pooling head) as transformers' ``SiglipVisionModel``:
    ``qkv`` split into q, k, v, the position embedding reshaped, the pooling head's q and
    kv joined into ``in_proj``. Inverse of
    [vit_from_transformers][vlakit.convert.vit_from_transformers]."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    block = vit.blocks[0]
    if vit.cls_token is not None or vit.reg_token is not None or not isinstance(
            block.ls1, nn.Identity) or isinstance(vit.norm, nn.Identity):
        raise ValueError("only SigLIP-shaped ViTs (no class/register tokens, no LayerScale, a "
                         "final norm) have a transformers SiglipVisionModel counterpart")
    config = SiglipVisionConfig(
        hidden_size=vit.dim, intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads,
        num_channels=vit.in_chans, image_size=vit.img_size[0], patch_size=vit.patch_size,
        layer_norm_eps=block.norm1.eps, hidden_act=_activation_name(block.mlp.act),
        vision_use_head=vit.attn_pool is not None,
    )
    state = {}
    for key, value in vit.state_dict().items():
        if key == "pos_embed":
            state["embeddings.position_embedding.weight"] = value[0]
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match:
            i, rest = match.groups()
            layer = f"encoder.layers.{i}"
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    state[f"{layer}.self_attn.{name}_proj.{kind}"] = part
                continue
            rest = (rest.replace("norm1.", "layer_norm1.").replace("norm2.", "layer_norm2.")
                    .replace("attn.proj.", "self_attn.out_proj."))
            state[f"{layer}.{rest}"] = value
        elif key.startswith("patch_embed.proj."):
            state[f"embeddings.patch_embedding.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("norm."):
            state[f"post_layernorm.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("attn_pool."):
            rest = key[len("attn_pool."):]
            head = "head"
            if rest == "latent":
                state[f"{head}.probe"] = value
            elif rest.startswith(("q.", "kv.")):
                continue  # joined below
            else:
                rest = rest.replace("proj.", "attention.out_proj.").replace("norm.", "layernorm.")
                state[f"{head}.{rest}"] = value
        else:
            raise CheckpointError(f"ViT key {key!r} has no SiglipVisionModel counterpart")
    if vit.attn_pool is not None:
        pool = vit.attn_pool.state_dict()
        for kind in ("weight", "bias"):
            state[f"head.attention.in_proj_{kind}"] = torch.cat(
                [pool[f"q.{kind}"], pool[f"kv.{kind}"]], 0)
    model = SiglipVisionModel(config).to(vit.pos_embed.dtype)
    if next(iter(model.state_dict())).startswith("vision_model."):  # transformers 4.x names
        state = {f"vision_model.{k}": v for k, v in state.items()}
    _load_exact(model, state, "ViT export")
    return model.eval()


def paligemma_to_transformers(model: nn.Module) -> nn.Module:
    """A PaliGemma-layout vlakit assembly (SigLIP-shaped ViT, linear projector, Gemma
    decoder, placeholder interleaver) as transformers' ``PaliGemmaForConditionalGeneration``
    with every weight; ``.save_pretrained(dir)`` writes transformers' format, which
    [load_paligemma][vlakit.models.load_paligemma] and transformers read back. Inverse of
    [paligemma_from_transformers][vlakit.models.paligemma_from_transformers]."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    family, text = _decoder_config(model.decoder)
    if family != "gemma":
        raise ValueError("PaliGemma's language model is a Gemma; this decoder is a Llama")
    vision = vit_to_transformers(model.encoder)
    linear = model.projector.linear
    text.bos_token_id, text.eos_token_id = model.interleaver.bos_id, model.interleaver.eos_id
    config = PaliGemmaConfig(
        vision_config=vision.config.to_dict(), text_config=text.to_dict(),
        image_token_id=model.interleaver.image_token_id, projection_dim=linear.out_features,
    )
    config.vision_config.projection_dim = linear.out_features
    hf = PaliGemmaForConditionalGeneration(config).to(linear.weight.dtype)
    state = {f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()}
    state.update({f"model.multi_modal_projector.linear.{k}": v
                  for k, v in linear.state_dict().items()})
    state.update(_decoder_state(model.decoder, prefix="model.language_model."))
    _load_exact(hf, state, "PaliGemma export")
    hf.tie_weights()
    return hf.eval()


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
