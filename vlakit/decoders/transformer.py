"""The own decoder: a layer stack plus its two ends, the token embedding and the LM head."""

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlakit.core.recording import recorded
from vlakit.core.sharding import check_gathered
from vlakit.decoders.embedding import TokenEmbedding
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.lm_head import TiedLMHead
from vlakit.decoders.rope import RotaryEmbedding
from vlakit.decoders.stack import LayerStack

__all__ = ["TransformerDecoder"]


@recorded
class TransformerDecoder(LayerStack):
    """A decoder-only transformer: a [`LayerStack`][vlakit.decoders.LayerStack] (layers,
    final norm, RoPE) with a token embedding in front and an LM head behind.

    ``forward`` is the stack's (the same layer loop, masks, cache, ``condition``,
    ``return_layers``); see [`LayerStack.forward`][vlakit.decoders.LayerStack.forward]. The
    decoder never guesses a mask: a dense boolean ``[b, q, k]`` or a
    [`MaskSpec`][vlakit.core.MaskSpec]; with a [`KVCache`][vlakit.decoders.KVCache] the mask
    covers the cached keys too: ``[b, q, cache.key_length(q)]``.

    Data path::

        ids [b, t] --embed_tokens--> [b, t, d]   (other embeddings may be spliced in)
        embeds [b, q, d] --layers[start:end] (RoPE at `positions`, `mask`)--> [b, q, d]
                         --norm (when the range ends at the last layer)--> hidden [b, q, d]
        hidden --logits--> [b, q, V]             (TiedLMHead when built without lm_head)

    The state dict holds ``embed.weight``, ``layers.{i}.…``, ``norm.…`` and (untied)
    ``lm_head.weight``; the ``layers`` and ``norm`` entries load into a ``LayerStack`` as
    they are. Every parameter is used inside some module's ``forward`` (the tied head is a
    [`TiedLMHead`][vlakit.decoders.TiedLMHead] module holding the embedding's
    ``Parameter``). ``embed_tokens`` and ``logits`` are the two entry points besides
    ``forward``; [`fully_shard_vla`][vlakit.distributed.fully_shard_vla] registers them
    with FSDP2.

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
        lm_head: nn.Module | None = None,
        max_seq_len: int = 4096,
    ) -> None:
        # not LayerStack.__init__: the embedding is registered first, so the state dict
        # keeps its order (embed, layers, norm, lm_head)
        nn.Module.__init__(self)
        self.embed = embed
        self._build(embed.embedding_dim, layers, norm, rope, max_seq_len)
        self.lm_head = TiedLMHead(embed) if lm_head is None else lm_head
        self.register_load_state_dict_pre_hook(_check_stored_tied_head)
        self.register_load_state_dict_post_hook(_retie_after_load)

    @property
    def dim(self) -> int:
        """Model width ``d``."""
        return self.embed.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.embed.num_embeddings

    @property
    def tied_embeddings(self) -> bool:
        return isinstance(self.lm_head, TiedLMHead)

    def tie_weights(self) -> None:
        """Re-point a tied LM head at the embedding's weight (after ``to_empty`` etc.)."""
        if isinstance(self.lm_head, TiedLMHead):
            self.lm_head.tie(self.embed)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.tie_weights()  # to_empty / device moves may replace the shared Parameter
        return out

    def embed_tokens(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t d"]:
        """Token ids to input embeddings (with the sqrt(d) scale if the model uses it).

        Ids outside ``[0, vocab_size)`` raise a ``ValueError`` naming the largest id and the
        vocabulary size (see [`validation`][vlakit.core.validation]).
        """
        check_gathered(self, "embed_tokens", uses=self.embed)
        return self.embed(ids)

    def logits(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        """Project hidden states to vocabulary logits."""
        check_gathered(self, "logits", uses=self.lm_head)
        return self.lm_head(hidden)


def _check_stored_tied_head(decoder: TransformerDecoder, state_dict, prefix, *args) -> None:
    # Before this decoder loads anything: a checkpoint may store a tied lm_head.weight too
    # (transformers' do); it must equal the embedding, since a tied head cannot hold it.
    if not isinstance(decoder.lm_head, TiedLMHead):
        return
    head, embed = state_dict.get(prefix + "lm_head.weight"), state_dict.get(prefix + "embed.weight")
    if head is None or embed is None or head.is_meta or embed.is_meta:
        return
    if head.shape != embed.shape or not torch.equal(head, embed.to(head.device, head.dtype)):
        raise ValueError(
            f"the checkpoint's {prefix}lm_head.weight differs from its {prefix}embed.weight, "
            f"but this decoder ties the two (built with lm_head=None / tie_embeddings=True); "
            f"build an untied decoder to load it"
        )


def _retie_after_load(decoder: TransformerDecoder, incompatible_keys) -> None:
    # load_state_dict(assign=True) replaces the embedding's Parameter: point the tied head
    # at the new one
    decoder.tie_weights()
