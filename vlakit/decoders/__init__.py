"""Transformer decoders: the language-model half of every VLA, and bare layer stacks.

- Protocols: [`Decoder`][vlakit.decoders.Decoder] (what the model may ask of a decoder,
  capabilities included) and [`DecoderStack`][vlakit.decoders.DecoderStack] (embeddings in,
  hidden states out, no token ends).
- [`LayerStack`][vlakit.decoders.LayerStack]: [`DecoderLayer`][vlakit.decoders.DecoderLayer] layers
  ([`Attention`][vlakit.decoders.Attention] + [`GatedMLP`][vlakit.decoders.GatedMLP] + norms),
  a final norm and a [`RotaryEmbedding`][vlakit.decoders.RotaryEmbedding]; runs under a mask
  with positions, an optional KV cache and an optional per-call ``condition``, and can hand
  back chosen layers' outputs ([`StackOutput`][vlakit.decoders.StackOutput]). pi0's action
  expert is one.
- [`TransformerDecoder`][vlakit.decoders.TransformerDecoder]: a stack plus a
  [`TokenEmbedding`][vlakit.decoders.TokenEmbedding] and an LM head (Llama, Gemma).
- [`HFDecoder`][vlakit.decoders.HFDecoder]: any transformers causal LM behind the same
  interface.
- Norms: [`RMSNorm`][vlakit.decoders.RMSNorm], and the
  [`ConditionedNorm`][vlakit.decoders.ConditionedNorm] kinds that read ``condition``:
  [`AdaptiveRMSNorm`][vlakit.decoders.AdaptiveRMSNorm] (pi0.5),
  [`AdaLayerNormZero`][vlakit.decoders.AdaLayerNormZero] (DiT).
- An action expert's joints: [`check_expert`][vlakit.decoders.check_expert] (an expert stack
  reads a decoder's KV cache), [`KeyValueLayer`][vlakit.decoders.KeyValueLayer] (a last layer
  whose keys and values alone are read: pi0's PaliGemma) and
  [`FinalAdaptiveRMSNorm`][vlakit.decoders.FinalAdaptiveRMSNorm] (pi0.5's final expert norm,
  no gate).
- Builders: [`transformer_decoder`][vlakit.decoders.transformer_decoder],
  [`transformer_stack`][vlakit.decoders.transformer_stack] (every knob),
  [`llama`][vlakit.decoders.llama], [`gemma`][vlakit.decoders.gemma],
  [`gemma_stack`][vlakit.decoders.gemma_stack], and the named sizes
  [`llama2_7b`][vlakit.decoders.llama2_7b], [`gemma_2b`][vlakit.decoders.gemma_2b],
  [`gemma_300m_stack`][vlakit.decoders.gemma_300m_stack].
- Caches, one class per mode: [`GrowingKVCache`][vlakit.decoders.GrowingKVCache],
  [`StaticKVCache`][vlakit.decoders.StaticKVCache], the read-only
  [`PrefixKVView`][vlakit.decoders.PrefixKVView] and
  [`SuffixKVView`][vlakit.decoders.SuffixKVView], sharing the
  [`KVCache`][vlakit.decoders.KVCache] interface; and
  [`greedy_generate`][vlakit.decoders.greedy_generate].
"""

from vlakit.decoders.attention import Attention
from vlakit.decoders.builders import (
    NormFactory,
    gemma,
    gemma_2b,
    gemma_300m_stack,
    gemma_stack,
    llama,
    llama2_7b,
    transformer_decoder,
    transformer_stack,
)
from vlakit.decoders.cache import GrowingKVCache, KVCache, PrefixKVView, StaticKVCache, SuffixKVView
from vlakit.decoders.embedding import TokenEmbedding, check_token_ids
from vlakit.decoders.expert import (
    FinalAdaptiveRMSNorm,
    KeyValueLayer,
    KeyValueProjection,
    attention_geometry,
    check_expert,
)
from vlakit.decoders.generation import greedy_generate, last_valid_index
from vlakit.decoders.hf import HFCache, HFDecoder
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.lm_head import TiedLMHead
from vlakit.decoders.mlp import GatedMLP
from vlakit.decoders.norms import AdaLayerNormZero, AdaptiveRMSNorm, ConditionedNorm, RMSNorm
from vlakit.decoders.protocol import Decoder, DecoderStack
from vlakit.decoders.rope import RotaryEmbedding, apply_rotary
from vlakit.decoders.stack import LayerStack, StackOutput
from vlakit.decoders.transformer import TransformerDecoder

__all__ = [
    "Decoder",
    "DecoderStack",
    "LayerStack",
    "StackOutput",
    "TransformerDecoder",
    "HFDecoder",
    "HFCache",
    "KVCache",
    "GrowingKVCache",
    "StaticKVCache",
    "PrefixKVView",
    "SuffixKVView",
    "DecoderLayer",
    "Attention",
    "GatedMLP",
    "RMSNorm",
    "ConditionedNorm",
    "AdaptiveRMSNorm",
    "AdaLayerNormZero",
    "FinalAdaptiveRMSNorm",
    "KeyValueLayer",
    "KeyValueProjection",
    "check_expert",
    "attention_geometry",
    "RotaryEmbedding",
    "apply_rotary",
    "TokenEmbedding",
    "TiedLMHead",
    "check_token_ids",
    "NormFactory",
    "transformer_decoder",
    "transformer_stack",
    "llama",
    "gemma",
    "gemma_stack",
    "llama2_7b",
    "gemma_2b",
    "gemma_300m_stack",
    "greedy_generate",
    "last_valid_index",
]
