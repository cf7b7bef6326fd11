"""Weight mapping between transformers' Llama/Gemma checkpoints and the own decoder.

Kept apart from the model code: one explicit rename table per source layout.
"""

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vlakit.core.checkpoint import CheckpointError, load_checked
from vlakit.decoders.builders import transformer_decoder
from vlakit.decoders.transformer import TransformerDecoder

__all__ = [
    "hf_decoder_key_to_vlakit",
    "convert_hf_decoder_state_dict",
    "load_hf_decoder_state_dict",
    "decoder_from_transformers",
]

# transformers (Llama and Gemma share the layout) -> vlakit, for keys below `model.`
_LAYER_RENAMES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embed_scale)$")


def hf_decoder_key_to_vlakit(key: str) -> str | None:
    """Map one transformers Llama/Gemma key to the own decoder's key.

    Accepts keys with or without the ``model.`` prefix (``model.layers.0.self_attn.q_proj.weight``
    or ``layers.0...``) and ``lm_head.weight``. Returns ``None`` for buffers that carry no
    weights (``rotary_emb.inv_freq``). Raises :class:`~vlakit.core.CheckpointError` (a
    ``KeyError``) naming the key if it is unknown.
    """
    if _IGNORED.search(key):
        return None
    if key == "lm_head.weight":
        return "lm_head.weight"
    inner = key.removeprefix("model.")
    if inner == "embed_tokens.weight":
        return "embed.weight"
    if inner == "norm.weight":
        return "norm.weight"
    m = _LAYER_KEY.match(inner)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"
    raise CheckpointError(f"unknown transformers decoder key {key!r}")


def convert_hf_decoder_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """Rename a transformers Llama/Gemma state dict (keys under ``prefix``) to vlakit keys.

    Keys not under ``prefix`` are ignored, so a whole VLA checkpoint can be passed with e.g.
    ``prefix="language_model."``.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        new = hf_decoder_key_to_vlakit(key[len(prefix) :])
        if new is not None:
            out[new] = value
    return out


def load_hf_decoder_state_dict(
    decoder: TransformerDecoder, state_dict: Mapping[str, Tensor], prefix: str = ""
) -> None:
    """Load a transformers-layout state dict into ``decoder``, strictly.

    A tied decoder accepts and drops a ``lm_head.weight``. Missing or unexpected keys and
    shape mismatches raise :class:`~vlakit.core.CheckpointError` (a ``KeyError`` and a
    ``ValueError``) naming the key; see :func:`~vlakit.core.load_checked`.
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
            f"rope_type {rope_type!r} is not supported by the own decoder (only 'default'); "
            f"use HFDecoder for this model"
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


_ACTIVATIONS = {
    "silu": lambda: nn.SiLU(),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": lambda: nn.GELU(),
}


def decoder_from_transformers(model: nn.Module) -> TransformerDecoder:
    """Build a :class:`TransformerDecoder` matching a transformers Llama or Gemma model.

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
            f"from_transformers expects a transformers Llama or Gemma model, got "
            f"{type(model).__name__}; wrap other causal LMs with HFDecoder"
        )
    config = model.config
    if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
        raise ValueError("attention_bias / mlp_bias checkpoints are not supported; use HFDecoder")
    act_name = getattr(config, "hidden_act", "silu")
    if act_name not in _ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act {act_name!r}; expected one of {list(_ACTIVATIONS)}"
        )
    is_causal_lm = hasattr(model, "lm_head")
    tied = bool(config.tie_word_embeddings) or not is_causal_lm
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    weight = next(model.parameters())
    with torch.device("meta"):
        decoder = transformer_decoder(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            hidden_dim=config.intermediate_size,
            head_dim=head_dim,
            activation=_ACTIVATIONS[act_name](),
            norm_eps=config.rms_norm_eps,
            norm_unit_offset=family == "gemma",
            embed_scale=family == "gemma",
            tie_embeddings=tied,
            rope_base=_rope_theta(config),
            max_seq_len=config.max_position_embeddings,
        )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load_hf_decoder_state_dict(decoder, state)
    return decoder.to(device=weight.device, dtype=weight.dtype)
