"""The own decoder: embeddings, pre-norm layers, final norm and LM head."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core.masks import check_mask_shape
from vlakit.decoders.cache import KVCache
from vlakit.decoders.embedding import TokenEmbedding
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.rope import RotaryEmbedding

__all__ = ["TransformerDecoder"]


class TransformerDecoder(nn.Module):
    """A decoder-only transformer that takes embeddings, an explicit mask and positions.

    The decoder never builds a mask itself: pass one from :mod:`vlakit.core.masks`
    (causal, prefix-LM, bidirectional, segment blocks). With a :class:`KVCache` the mask
    covers the cached keys too: ``[b, q, cached + q]``.

    Data path::

        ids [b, t] --embed_tokens--> [b, t, d]   (other embeddings may be spliced in)
        embeds [b, q, d] --layers (RoPE at `positions`, `mask`)--> --norm--> hidden [b, q, d]
        hidden --logits--> [b, q, V]             (tied to the embedding when lm_head is None)

    Args:
        embed: token embedding ``V x d``.
        layers: the decoder layers, applied in order.
        norm: final norm.
        rope: rotary embedding shared by all layers.
        lm_head: output projection ``d -> V``; ``None`` ties it to ``embed.weight``.
        max_seq_len: largest position (exclusive) the model accepts.
    """

    def __init__(
        self,
        embed: TokenEmbedding,
        layers: Sequence[DecoderLayer],
        norm: nn.Module,
        rope: RotaryEmbedding,
        lm_head: nn.Linear | None = None,
        max_seq_len: int = 4096,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rope = rope
        self.lm_head = lm_head
        self.max_seq_len = max_seq_len

    @property
    def dim(self) -> int:
        """Model width ``d``."""
        return self.embed.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.embed.num_embeddings

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is None

    def embed_tokens(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t d"]:
        """Token ids to input embeddings (with the sqrt(d) scale if the model uses it)."""
        return self.embed(ids)

    def new_cache(self) -> KVCache:
        """An empty KV cache sized for this decoder."""
        return KVCache(self.num_layers)

    def forward(
        self,
        embeds: Float[Tensor, "b q d"],
        mask: Bool[Tensor, "b q k"],
        positions: Int[Tensor, "b q"],
        cache: KVCache | None = None,
    ) -> Float[Tensor, "b q d"]:
        """Run all layers and the final norm.

        Args:
            embeds: ``[b, q, d]`` input embeddings.
            mask: ``[b, q, k]`` boolean, ``True`` = may attend; ``k = len(cache) + q``.
            positions: ``[b, q]`` RoPE positions, each ``< max_seq_len``.
            cache: optional :class:`KVCache` (appended to unless read-only).

        Returns:
            ``[b, q, d]`` final hidden states (after the final norm).
        """
        self._check_inputs(embeds, mask, positions, cache)
        cos, sin = self.rope(positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def logits(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        """Project hidden states to vocabulary logits."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed.weight)
        return self.lm_head(hidden)

    def _check_inputs(
        self, embeds: Tensor, mask: Tensor, positions: Tensor, cache: KVCache | None
    ) -> None:
        if embeds.shape[-1] != self.dim:
            raise ValueError(
                f"embeddings have width {embeds.shape[-1]}, but the decoder's hidden size is "
                f"{self.dim}"
            )
        b, q = embeds.shape[:2]
        cached = 0 if cache is None else len(cache)
        check_mask_shape(mask, b, q, cached + q)
        if tuple(positions.shape) != (b, q):
            raise ValueError(f"positions must be [{b}, {q}], got {tuple(positions.shape)}")
        if torch.compiler.is_compiling() or positions.device.type == "meta":
            return
        top = int(positions.max())
        if top >= self.max_seq_len or int(positions.min()) < 0:
            raise ValueError(
                f"position {top} is outside [0, max_seq_len={self.max_seq_len}) that the "
                f"decoder was built with"
            )

    @classmethod
    def from_transformers(cls, model: nn.Module) -> "TransformerDecoder":
        """Build the matching decoder from a transformers Llama or Gemma causal LM.

        Accepts ``LlamaForCausalLM``, ``GemmaForCausalLM`` (any size) or their bare
        ``LlamaModel``/``GemmaModel``; copies every weight. See
        :func:`vlakit.decoders.weights.decoder_from_transformers`.
        """
        from vlakit.decoders.weights import decoder_from_transformers

        return decoder_from_transformers(model)
