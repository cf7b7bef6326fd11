"""Transformer decoders: the language-model half of every VLA.

- [`TransformerDecoder`][vlakit.decoders.TransformerDecoder]: the own Llama/Gemma-style decoder,
  built from
  [`TokenEmbedding`][vlakit.decoders.TokenEmbedding], [`DecoderLayer`][vlakit.decoders.DecoderLayer]
  ([`Attention`][vlakit.decoders.Attention] + [`GatedMLP`][vlakit.decoders.GatedMLP]
  + [`RMSNorm`][vlakit.decoders.RMSNorm]), [`RotaryEmbedding`][vlakit.decoders.RotaryEmbedding] and
  an optional LM head.
- [`HFDecoder`][vlakit.decoders.HFDecoder]: any transformers causal LM behind the same interface.
- Builders: [`llama`][vlakit.decoders.llama], [`gemma`][vlakit.decoders.gemma],
  [`transformer_decoder`][vlakit.decoders.transformer_decoder] (every knob) and the
  named sizes [`llama2_7b`][vlakit.decoders.llama2_7b], [`gemma_2b`][vlakit.decoders.gemma_2b].
- [`KVCache`][vlakit.decoders.KVCache] (append, or read-only prefix) and
  [`greedy_generate`][vlakit.decoders.greedy_generate].
"""

from vlakit.decoders.attention import Attention
from vlakit.decoders.builders import gemma, gemma_2b, llama, llama2_7b, transformer_decoder
from vlakit.decoders.cache import KVCache
from vlakit.decoders.embedding import TokenEmbedding, check_token_ids
from vlakit.decoders.generation import greedy_generate, last_valid_index
from vlakit.decoders.hf import HFCache, HFDecoder
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.lm_head import TiedLMHead
from vlakit.decoders.mlp import GatedMLP
from vlakit.decoders.norms import RMSNorm
from vlakit.decoders.rope import RotaryEmbedding, apply_rotary
from vlakit.decoders.transformer import TransformerDecoder

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
    "TiedLMHead",
    "check_token_ids",
    "transformer_decoder",
    "llama",
    "gemma",
    "llama2_7b",
    "gemma_2b",
    "greedy_generate",
    "last_valid_index",
]
