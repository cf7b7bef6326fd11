"""Transformer decoders: the language-model half of every VLA.

- :class:`TransformerDecoder`: the own Llama/Gemma-style decoder, built from
  :class:`TokenEmbedding`, :class:`DecoderLayer` (:class:`Attention` + :class:`GatedMLP`
  + :class:`RMSNorm`), :class:`RotaryEmbedding` and an optional LM head.
- :class:`HFDecoder`: any transformers causal LM behind the same interface.
- Builders: :func:`llama`, :func:`gemma`, :func:`transformer_decoder` (every knob) and the
  named sizes :func:`llama2_7b`, :func:`gemma_2b`.
- :class:`KVCache` (append, or read-only prefix) and :func:`greedy_generate`.
"""

from vlakit.decoders.attention import Attention
from vlakit.decoders.builders import gemma, gemma_2b, llama, llama2_7b, transformer_decoder
from vlakit.decoders.cache import KVCache
from vlakit.decoders.embedding import TokenEmbedding
from vlakit.decoders.generation import greedy_generate, last_valid_index
from vlakit.decoders.hf import HFCache, HFDecoder
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.mlp import GatedMLP
from vlakit.decoders.norms import RMSNorm
from vlakit.decoders.rope import RotaryEmbedding, apply_rotary
from vlakit.decoders.transformer import TransformerDecoder
from vlakit.decoders.weights import (
    convert_hf_decoder_state_dict,
    decoder_from_transformers,
    hf_decoder_key_to_vlakit,
    load_hf_decoder_state_dict,
)

__all__ = [
    "TransformerDecoder",
    "HFDecoder",
    "HFCache",
    "KVCache",
    "DecoderLayer",
    "Attention",
    "GatedMLP",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "TokenEmbedding",
    "transformer_decoder",
    "llama",
    "gemma",
    "llama2_7b",
    "gemma_2b",
    "greedy_generate",
    "last_valid_index",
    "decoder_from_transformers",
    "hf_decoder_key_to_vlakit",
    "convert_hf_decoder_state_dict",
    "load_hf_decoder_state_dict",
]
