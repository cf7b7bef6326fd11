"""What a decoder offers the model: two ``typing.Protocol`` classes, checked at run time.

[`DecoderStack`][vlakit.decoders.DecoderStack] is what anything that runs embeddings offers
(a bare [`LayerStack`][vlakit.decoders.LayerStack] such as pi0's action expert);
[`Decoder`][vlakit.decoders.Decoder] adds the two ends a language decoder has (token
embedding, LM head). [`TransformerDecoder`][vlakit.decoders.TransformerDecoder] and
[`HFDecoder`][vlakit.decoders.HFDecoder] both satisfy ``Decoder``. The capabilities are
plain boolean attributes every implementation defines, so the model reads them directly
(``decoder.supports_layer_ranges``) instead of guessing with ``getattr``.
"""

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlakit.core.masks import MaskSpec
from vlakit.core.tap import AttentionTap

__all__ = ["DecoderStack", "Decoder"]


@runtime_checkable
class DecoderStack(Protocol):
    """Embeddings in, hidden states out, under an explicit mask and positions.

    Attributes:
        dim: model width ``d`` of the embeddings it takes and the hidden states it returns.
        num_layers: number of layers (the cache's layer count).
        max_seq_len: positions must be below this (``None``: no known limit); the model
            refuses a sequence longer than it up front, naming both lengths.
        condition_dim: width ``c`` of the per-call ``condition`` its norms read, or
            ``None`` when it reads none (and refuses one).
        supports_layer_ranges: ``start_layer`` / ``end_layer`` run part of the layers (a
            pruner between two layers).
        supports_read_only_cache: a cache filled once with a prefix can be read by many
            suffixes (``cache.read_only()``, ``suffix_view``, ``expand_batch``): diffusion
            and flow-matching heads.
        supports_attention_tap: ``tap=AttentionTap(...)`` reads one layer's attention
            weights (score-based pruners).
        supports_return_layers: ``return_layers=(i, ...)`` also returns those layers'
            outputs (GR00T-style heads reading middle layers).

    A keyword whose capability is ``False`` raises when given a non-default value; nothing
    is silently ignored.
    """

    dim: int
    num_layers: int
    max_seq_len: int | None
    condition_dim: int | None
    supports_layer_ranges: bool
    supports_read_only_cache: bool
    supports_attention_tap: bool
    supports_return_layers: bool

    def new_cache(self, max_len: int | None = None) -> Any:
        """An empty cache: appending (``max_len=None``) or preallocated to ``max_len``
        positions where the implementation supports it."""
        ...

    def __call__(
        self,
        embeds: Float[Tensor, "b q d"],
        mask: Bool[Tensor, "b q k"] | MaskSpec,
        positions: Int[Tensor, "b q"],
        cache: Any = None,
        start_layer: int = 0,
        end_layer: int | None = None,
        tap: AttentionTap | None = None,
        *,
        condition: Float[Tensor, "b c"] | Float[Tensor, "b q c"] | None = None,
        return_layers: Sequence[int] | None = None,
    ) -> Any:
        """``[b, q, d]`` hidden states (after the final norm when the last layer ran), or
        ``(hidden, {i: layer i's output})`` with ``return_layers``."""
        ...


@runtime_checkable
class Decoder(DecoderStack, Protocol):
    """A [`DecoderStack`][vlakit.decoders.DecoderStack] with a token embedding and an LM head.

    Attributes:
        vocab_size: vocabulary ``V`` (token ids ``0..V-1``).
    """

    vocab_size: int

    def embed_tokens(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t d"]:
        """Token ids to input embeddings; ids outside ``[0, V)`` raise a ``ValueError``."""
        ...

    def logits(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        """Hidden states to vocabulary logits."""
        ...
