"""Weights of transformers' Llama and Gemma causal LMs -> the own
[`TransformerDecoder`][vlakit.decoders.TransformerDecoder].

One rename table (`HF_DECODER_RULES`, rules for [`rename_keys`][vlakit.convert.rename_keys])
serves both families, which share transformers' layout::

    [model.]embed_tokens.weight                      -> embed.weight
    [model.]layers.{i}.self_attn.{q,k,v,o}_proj.*   -> layers.{i}.attn.{q,k,v,o}_proj.*
    [model.]layers.{i}.mlp.{gate,up,down}_proj.*    -> layers.{i}.mlp.{gate,up,down}_proj.*
    [model.]layers.{i}.input_layernorm.weight        -> layers.{i}.attn_norm.weight
    [model.]layers.{i}.post_attention_layernorm.*    -> layers.{i}.mlp_norm.weight
    [model.]norm.weight                              -> norm.weight
    lm_head.weight                                   -> lm_head.weight
    *rotary_emb.inv_freq, *embed_scale               -> dropped (no weights)

Any other key raises [`CheckpointError`][vlakit.core.CheckpointError] naming it.
"""

from collections.abc import Mapping

from torch import Tensor, nn

from vlakit.convert.rename import Rules, rename_keys
from vlakit.core.checkpoint import load_checked
from vlakit.decoders import TransformerDecoder, transformer_decoder

__all__ = [
    "HF_DECODER_RULES",
    "convert_hf_decoder_state_dict",
    "load_hf_decoder_state_dict",
    "decoder_from_transformers",
    "decoder_spec",
]

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
