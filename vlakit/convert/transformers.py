"""transformers' formats <-> vlakit blocks, both ways.

Read: ``SiglipVisionModel`` -> the own [`ViT`][vlakit.vision.ViT] (renamed, separate
q/k/v fused into ``qkv``, the position embedding reshaped, the pooling head's ``in_proj``
split into ``q``/``kv``); Llama and Gemma causal LMs -> the own
[`TransformerDecoder`][vlakit.decoders.TransformerDecoder]. One rename table
(``HF_DECODER_RULES``, rules for [`rename_keys`][vlakit.convert.rename_keys]) serves both
decoder families, which share transformers' layout::

    [model.]embed_tokens.weight                      -> embed.weight
    [model.]layers.{i}.self_attn.{q,k,v,o}_proj.*   -> layers.{i}.attn.{q,k,v,o}_proj.*
    [model.]layers.{i}.mlp.{gate,up,down}_proj.*    -> layers.{i}.mlp.{gate,up,down}_proj.*
    [model.]layers.{i}.input_layernorm.weight        -> layers.{i}.attn_norm.weight
    [model.]layers.{i}.post_attention_layernorm.*    -> layers.{i}.mlp_norm.weight
    [model.]norm.weight                              -> norm.weight
    lm_head.weight                                   -> lm_head.weight
    *rotary_emb.inv_freq, *embed_scale               -> dropped (no weights)

Any other key raises [`CheckpointError`][vlakit.core.CheckpointError] naming it.
Architectures come from the configs alone ([siglip_vit_spec][vlakit.convert.siglip_vit_spec],
[decoder_spec][vlakit.convert.decoder_spec]), built on the ``meta`` device.

Write (the inverse of each reader, exact round trips, tested): ``decoder_to_transformers``,
``vit_to_transformers``, ``paligemma_to_transformers``; ``.save_pretrained(dir)`` on the
result writes transformers' own format.
"""

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vlakit.convert._vit import build_and_load
from vlakit.convert.rename import Rules, rename_keys
from vlakit.core.checkpoint import CheckpointError, load_checked
from vlakit.decoders import TransformerDecoder, transformer_decoder
from vlakit.vision import PreprocessConfig, ViT
from vlakit.vision.base import as_hw

__all__ = [
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
]


# -- SigLIP vision towers --------------------------------------------------------------------

def _siglip_rules() -> Rules:
    wb = r"(weight|bias)"
    layer = r"encoder\.layers\.(\d+)"
    return [
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
            raise CheckpointError(
                f"expected transformers SigLIP keys under the prefix {prefix!r}, but no "
                "checkpoint key starts with it"
            )
    renamed = rename_keys(state_dict, _siglip_rules(), "transformers SigLIP")
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
            raise CheckpointError(
                f"fusing {key!r} needs the q, k and v projections, but the checkpoint lacks "
                f"{', '.join(absent)}"
            )
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out

def vit_from_transformers(
    model: nn.Module,
    output_layer: int = -1,
    preprocessing: PreprocessConfig | None = None,
) -> ViT:
    """Copy a transformers ``SiglipVisionModel`` (or a ``SiglipModel``'s vision half) into
    the own [`ViT`][vlakit.vision.ViT], on the source's device and dtype.

    Args:
        model: the transformers model.
        output_layer: block whose output the ViT returns.
        preprocessing: defaults to SigLIP's: the config's image size, mean = std = 0.5,
            bicubic.
    """
    if hasattr(model, "vision_model"):
        model = model.vision_model
    config = getattr(model, "config", None)
    map_head = bool(getattr(model, "use_head", getattr(config, "vision_use_head", True)))
    spec = siglip_vit_spec(config, output_layer, preprocessing, map_head=map_head)
    weights = transformers_siglip_to_vit(model.state_dict())
    return build_and_load(spec, weights, model, "transformers SiglipVisionModel")

def siglip_vit_spec(
    config: Any,
    output_layer: int = -1,
    preprocessing: PreprocessConfig | None = None,
    map_head: bool | None = None,
) -> dict[str, Any]:
    """The own ViT's arguments ([`vit`][vlakit.vision]) for a transformers
    ``SiglipVisionConfig``: the architecture from the config alone, nothing built.
    ``map_head`` defaults to the config's ``vision_use_head``."""
    model_type = getattr(config, "model_type", None)
    if model_type != "siglip_vision_model":
        raise TypeError(
            "expected a SigLIP vision config (model_type 'siglip_vision_model'), got "
            f"{type(config).__name__} with model_type {model_type!r}"
        )
    act = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}.get(config.hidden_act)
    if act is None:
        raise ValueError(
            "SigLIP's hidden_act must be 'gelu_pytorch_tanh', 'gelu_new' or 'gelu', got "
            f"{config.hidden_act!r}"
        )
    size = as_hw(config.image_size)
    if map_head is None:
        map_head = bool(getattr(config, "vision_use_head", True))
    return dict(
        img_size=size,
        patch_size=int(config.patch_size),
        in_chans=config.num_channels,
        dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        qkv_bias=True,
        layer_scale_init=None,
        gelu_approximate=act,
        norm_eps=config.layer_norm_eps,
        class_token=False,
        reg_tokens=0,
        pos_embed_prefix=False,
        final_norm=True,
        map_head=map_head,
        output_layer=output_layer,
        dynamic_img_size=False,
        preprocessing=preprocessing or PreprocessConfig(size=size, mean=(0.5,) * 3, std=(0.5,) * 3),
    )


# -- Llama and Gemma decoders -----------------------------------------------------------------

_M = r"(?:model\.)?"
_WB = r"(weight|bias)"

HF_DECODER_RULES: Rules = (
    (rf"{_M}embed_tokens\.weight", "embed.weight"),
    (rf"{_M}layers\.(\d+)\.self_attn\.([qkvo])_proj\.{_WB}", r"layers.\1.attn.\2_proj.\3"),
    (rf"{_M}layers\.(\d+)\.mlp\.(gate|up|down)_proj\.{_WB}", r"layers.\1.mlp.\2_proj.\3"),
    (rf"{_M}layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (rf"{_M}layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (rf"{_M}norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r".*(rotary_emb\.inv_freq|embed_scale)", None),
)
"""transformers Llama/Gemma keys (with or without ``model.``) -> own decoder keys."""


def convert_hf_decoder_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """Rename a transformers Llama/Gemma state dict (keys under ``prefix``) to vlakit keys.

    Keys not under ``prefix`` are ignored, so a whole VLA checkpoint can be passed with e.g.
    ``prefix="language_model."``. A key under ``prefix`` that matches no rule of
    `HF_DECODER_RULES` raises [`CheckpointError`][vlakit.core.CheckpointError] naming it.
    """
    inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return rename_keys(inner, HF_DECODER_RULES, source="transformers decoder")


def load_hf_decoder_state_dict(
    decoder: TransformerDecoder, state_dict: Mapping[str, Tensor], prefix: str = ""
) -> None:
    """Load a transformers-layout state dict into ``decoder``, strictly.

    A tied decoder takes its head from the embedding: a stored ``lm_head.weight`` is
    dropped. Missing or unexpected keys and shape mismatches raise
    [`CheckpointError`][vlakit.core.CheckpointError] (a ``KeyError`` and a ``ValueError``)
    naming the key; see [`load_checked`][vlakit.core.load_checked].
    """
    converted = convert_hf_decoder_state_dict(state_dict, prefix)
    if decoder.tied_embeddings:
        converted.pop("lm_head.weight", None)
    load_checked(decoder, converted, source="transformers decoder checkpoint")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by vlakit's TransformerDecoder (only "
            f"'default', plain RoPE); wrap this model with HFDecoder instead"
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


_ACTIVATIONS = {
    "silu": lambda: nn.SiLU(),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": lambda: nn.GELU(),
}


def decoder_from_transformers(model: nn.Module) -> TransformerDecoder:
    """Build a [`TransformerDecoder`][vlakit.decoders.TransformerDecoder] matching a transformers
    Llama or
    Gemma model.

    Accepts ``LlamaForCausalLM``/``GemmaForCausalLM`` or the bare ``LlamaModel``/
    ``GemmaModel``, of any size; the result has the same dtype and device and a copy of
    every weight. Any other model class raises a ``TypeError`` naming it.
    """
    from transformers import GemmaForCausalLM, GemmaModel, LlamaForCausalLM, LlamaModel

    if isinstance(model, (LlamaForCausalLM, LlamaModel)):
        family = "llama"
    elif isinstance(model, (GemmaForCausalLM, GemmaModel)):
        family = "gemma"
    else:
        raise TypeError(
            f"decoder_from_transformers expects a transformers Llama or Gemma model, got "
            f"{type(model).__name__}; wrap other causal LMs with HFDecoder"
        )
    is_causal_lm = hasattr(model, "lm_head")
    weight = next(model.parameters())
    decoder = transformer_decoder(**decoder_spec(model.config, family, is_causal_lm),
                                  device="meta")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load_hf_decoder_state_dict(decoder, state)  # the decoder re-ties a tied head after loading
    return decoder.to(device=weight.device, dtype=weight.dtype)


def decoder_spec(config, family: str, has_lm_head: bool = True) -> dict:
    """[transformer_decoder][vlakit.decoders.transformer_decoder]'s arguments for a
    transformers Llama or Gemma config (``family``: ``"llama"`` or ``"gemma"``): the
    architecture from the config alone. ``has_lm_head=False`` (a bare ``LlamaModel``) ties
    the head. Biases, other activations and RoPE scaling raise a ``ValueError`` (wrap such
    models with ``HFDecoder``)."""
    if family not in ("llama", "gemma"):
        raise ValueError(f"family must be 'llama' or 'gemma', got {family!r}")
    if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
        raise ValueError(
            f"this model has biases (attention_bias={getattr(config, 'attention_bias', False)}, "
            f"mlp_bias={getattr(config, 'mlp_bias', False)}), which vlakit's TransformerDecoder "
            f"does not have; wrap the model with HFDecoder instead"
        )
    act_name = getattr(config, "hidden_act", "silu")
    if act_name not in _ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act {act_name!r}; expected one of {list(_ACTIVATIONS)} (or "
            f"wrap the model with HFDecoder)"
        )
    tied = bool(config.tie_word_embeddings) or not has_lm_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return dict(
        vocab_size=config.vocab_size,
        dim=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        mlp_dim=config.intermediate_size,
        head_dim=head_dim,
        activation=_ACTIVATIONS[act_name](),
        norm_eps=config.rms_norm_eps,
        norm_unit_offset=family == "gemma",
        scale_by_sqrt_dim=family == "gemma",
        tie_embeddings=tied,
        rope_base=_rope_theta(config),
        max_seq_len=config.max_position_embeddings,
    )


# -- export ----------------------------------------------------------------------------------

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


def _siglip_state(vit: nn.Module) -> dict[str, Tensor]:
    """The own ViT's weights under ``SiglipVisionModel``'s names (transformers 5.x)."""
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
    return state


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
    state = _siglip_state(vit)
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
