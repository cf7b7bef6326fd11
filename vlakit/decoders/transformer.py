"""The own decoder: embeddings, pre-norm layers, final norm and LM head."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core.checks import should_validate
from vlakit.core.masks import MaskSpec, check_mask_shape
from vlakit.core.recording import recorded
from vlakit.core.tap import AttentionTap
from vlakit.decoders.cache import KVCache
from vlakit.decoders.embedding import TokenEmbedding
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.lm_head import TiedLMHead
from vlakit.decoders.rope import RotaryEmbedding

__all__ = ["TransformerDecoder"]


@recorded
class TransformerDecoder(nn.Module):
    """A decoder-only transformer that takes embeddings, an explicit mask and positions.

    The decoder never guesses a mask: pass a dense boolean ``[b, q, k]`` from
    [`vlakit.core`][vlakit.core] (causal, prefix-LM, bidirectional, segment blocks), or a
    [`MaskSpec`][vlakit.core.MaskSpec] from a mask policy, which lets the decoder take
    SDPA's ``is_causal`` fast path when the mask is plainly causal (same numbers). With a
    [`KVCache`][vlakit.decoders.KVCache] the mask covers the cached keys too:
    ``[b, q, cache.key_length(q)]``.

    Data path::

        ids [b, t] --embed_tokens--> [b, t, d]   (other embeddings may be spliced in)
        embeds [b, q, d] --layers[start:end] (RoPE at `positions`, `mask`)--> [b, q, d]
                         --norm (when the range ends at the last layer)--> hidden [b, q, d]
        hidden --logits--> [b, q, V]             (TiedLMHead when built without lm_head)

    Every parameter is used inside some module's ``forward`` (the tied head is a
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
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rope = rope
        self.lm_head = TiedLMHead(embed) if lm_head is None else lm_head
        self.max_seq_len = max_seq_len
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
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tied_embeddings(self) -> bool:
        return isinstance(self.lm_head, TiedLMHead)

    def tie_weights(self) -> None:
        """Re-point a tied LM head at the embedding's weight (after ``to_empty`` etc.)."""
        if isinstance(self.lm_head, TiedLMHead):
            self.lm_head.tie(self.embed)

    supports_read_only_cache = True
    """A prefix cache can be read by many suffixes (diffusion, flow matching)."""

    supports_layer_ranges = True
    """``forward`` runs any range of layers (a pruner may sit between two layers)."""

    supports_attention_tap = True
    """``forward(..., tap=AttentionTap(...))`` reads one layer's attention weights."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.tie_weights()  # to_empty / device moves may replace the shared Parameter
        return out

    def embed_tokens(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t d"]:
        """Token ids to input embeddings (with the sqrt(d) scale if the model uses it).

        Ids outside ``[0, vocab_size)`` raise a ``ValueError`` naming the largest id and the
        vocabulary size (see [`validation`][vlakit.core.validation]).
        """
        return self.embed(ids)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this decoder: appending, or preallocated to ``max_len``
        positions (fixed shapes per step: a compiled decoder compiles once)."""
        return KVCache(self.num_layers, max_len=max_len)

    def forward(
        self,
        embeds: Float[Tensor, "b q d"],
        mask: Bool[Tensor, "b q k"] | MaskSpec,
        positions: Int[Tensor, "b q"],
        cache: KVCache | None = None,
        start_layer: int = 0,
        end_layer: int | None = None,
        tap: AttentionTap | None = None,
    ) -> Float[Tensor, "b q d"]:
        """Run layers ``[start_layer, end_layer)`` (all by default) and, when the range
        ends at the last layer, the final norm.

        Running a range lets a block sit between layers (a token pruner before layer ``k``:
        ``decoder(x, m, p, end_layer=k)``, prune, ``decoder(x', m', p', start_layer=k)``).

        Args:
            embeds: ``[b, q, d]`` input embeddings (hidden states when ``start_layer > 0``).
            mask: ``[b, q, k]`` boolean, ``True`` = may attend, ``k = cache.key_length(q)``
                (a mask narrower than a preallocated cache is padded with ``False``); or a
                [`MaskSpec`][vlakit.core.MaskSpec].
            positions: ``[b, q]`` RoPE positions, each ``< max_seq_len``.
            cache: optional [`KVCache`][vlakit.decoders.KVCache] (written to unless
                read-only).
            start_layer: first layer to run.
            end_layer: one past the last layer to run (``None``: all).
            tap: an [AttentionTap][vlakit.core.AttentionTap] to fill with the attention
                weights of ``tap.layer`` (which must be in the range run) at its queries.

        Returns:
            ``[b, q, d]`` hidden states (after the final norm if the last layer ran).
        """
        end = self.num_layers if end_layer is None else end_layer
        if not 0 <= start_layer <= end <= self.num_layers:
            raise ValueError(
                f"layer range [{start_layer}, {end}) is not inside the decoder's "
                f"{self.num_layers} layers: need 0 <= start_layer <= end_layer <= "
                f"{self.num_layers}"
            )
        if tap is not None and not start_layer <= tap.layer < end:
            raise ValueError(
                f"the attention tap asks for layer {tap.layer}, but this call runs layers "
                f"[{start_layer}, {end}) of the decoder's {self.num_layers} (0.."
                f"{self.num_layers - 1})"
            )
        attn_mask = self._attention_mask(embeds, mask, positions, cache)
        cos, sin = self.rope(positions, embeds.dtype)
        x = embeds
        for i in range(start_layer, end):
            if tap is not None and i == tap.layer:
                x = self.layers[i](x, cos, sin, attn_mask, cache, i, tap)
            else:
                x = self.layers[i](x, cos, sin, attn_mask, cache, i)
        if end < self.num_layers:
            return x
        if cache is not None:
            cache.advance(embeds.shape[1])
        return self.norm(x)

    def logits(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        """Project hidden states to vocabulary logits."""
        return self.lm_head(hidden)

    def _attention_mask(
        self, embeds: Tensor, mask: Tensor | MaskSpec, positions: Tensor, cache: KVCache | None
    ) -> Tensor | None:
        """Check the inputs; return the dense mask for the layers, or ``None`` for SDPA's
        plain-causal path."""
        if embeds.shape[-1] != self.dim:
            raise ValueError(
                f"embeddings have width {embeds.shape[-1]}, but the decoder's hidden size is "
                f"{self.dim}"
            )
        b, q = embeds.shape[:2]
        if tuple(positions.shape) != (b, q):
            raise ValueError(
                f"positions must be [batch, tokens] = [{b}, {q}], got {tuple(positions.shape)}"
            )
        keys = q if cache is None else cache.key_length(q)
        if isinstance(mask, MaskSpec):
            if mask.shape != (b, q, q):
                raise ValueError(
                    f"the mask (a MaskSpec) is [batch={mask.shape[0]}, tokens={mask.shape[1]}], "
                    f"but the embeddings are [batch={b}, tokens={q}]; build the mask from the "
                    f"same sequence as the embeddings"
                )
            if mask.is_causal and keys == q:
                mask = None
            else:
                mask = mask.dense()
        if mask is not None:
            if cache is not None and cache.is_preallocated and mask.shape[-1] < keys:
                mask = F.pad(mask, (0, keys - mask.shape[-1]), value=False)
            check_mask_shape(mask, b, q, keys)
        if should_validate(positions):
            bottom, top = torch.aminmax(positions)  # one read-back for both
            bottom, top = int(bottom), int(top)
            if top >= self.max_seq_len or bottom < 0:
                bad = top if top >= self.max_seq_len else bottom
                raise ValueError(
                    f"position {bad} is outside [0, max_seq_len={self.max_seq_len}) that the "
                    f"decoder was built with"
                )
        return mask


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
