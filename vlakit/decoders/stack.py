"""The layer stack: pre-norm layers, the final norm and RoPE, with no token embedding and no
LM head. An action expert is a stack; a language decoder is a stack plus its two ends."""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core.checks import should_validate
from vlakit.core.masks import MaskSpec, check_mask_shape
from vlakit.core.recording import recorded
from vlakit.core.tap import AttentionTap
from vlakit.decoders.cache import GrowingKVCache, KVCache, StaticKVCache
from vlakit.decoders.layer import DecoderLayer
from vlakit.decoders.norms import ConditionedNorm
from vlakit.decoders.rope import RotaryEmbedding

__all__ = ["LayerStack", "StackOutput"]


class StackOutput(NamedTuple):
    """What a forward with ``return_layers=`` returns (unpacks as ``hidden, layers``).

    Attributes:
        hidden: ``[b, q, d]`` the forward's usual result (after the final norm when the
            range ran the last layer).
        layers: ``{i: [b, q, d]}`` for each requested layer ``i``: the output of layer ``i``
            (its MLP residual added), before any later layer and before the final norm.
            Layer ``i`` here is transformers' ``hidden_states[i + 1]`` for every layer but
            the last (whose transformers entry has the final norm applied).
    """

    hidden: Tensor
    layers: dict[int, Tensor]


@recorded
class LayerStack(nn.Module):
    """Decoder layers, a final norm and the rotary embedding they share: embeddings in,
    hidden states out.

    The stack never guesses a mask: pass a dense boolean ``[b, q, k]`` from
    [`vlakit.core`][vlakit.core] (causal, prefix-LM, bidirectional, segment blocks), or a
    [`MaskSpec`][vlakit.core.MaskSpec] from a mask policy, which lets it take SDPA's
    ``is_causal`` fast path when the mask is plainly causal (same numbers). With a
    [`KVCache`][vlakit.decoders.KVCache] the mask covers the cached keys too:
    ``[b, q, cache.key_length(q)]``.

    Data path::

        embeds [b, q, d] --layers[start:end] (RoPE at `positions`, `mask`, `condition`)-->
                         --norm (when the range ends at the last layer)--> hidden [b, q, d]

    Norms that read a per-call condition ([`ConditionedNorm`][vlakit.decoders.ConditionedNorm]:
    pi0.5's adaptive RMSNorm, DiT's adaLN-Zero) get ``condition`` in every layer and in the
    final norm (whose gate is not used). Such a stack refuses a call without a condition, a
    stack without them refuses one with it.

    Its state dict holds ``layers.{i}.…`` and ``norm.…`` only (the names
    [`TransformerDecoder`][vlakit.decoders.TransformerDecoder] uses for the same modules),
    so a checkpoint of a decoder's layers and final norm loads into it strictly.

    Args:
        dim: model width ``d``.
        layers: the decoder layers, applied in order.
        norm: final norm (plain, or a ``ConditionedNorm``).
        rope: rotary embedding shared by all layers.
        max_seq_len: largest position (exclusive) the stack accepts.
    """

    supports_read_only_cache = True
    """A prefix cache can be read by many suffixes (diffusion, flow matching)."""

    supports_layer_ranges = True
    """``forward`` runs any range of layers (a pruner may sit between two layers)."""

    supports_attention_tap = True
    """``forward(..., tap=AttentionTap(...))`` reads one layer's attention weights."""

    supports_return_layers = True
    """``forward(..., return_layers=(i, j))`` also returns those layers' hidden states."""

    def __init__(
        self,
        dim: int,
        layers: Sequence[DecoderLayer],
        norm: nn.Module,
        rope: RotaryEmbedding,
        max_seq_len: int = 4096,
    ) -> None:
        super().__init__()
        self._build(dim, layers, norm, rope, max_seq_len)

    def _build(
        self,
        dim: int,
        layers: Sequence[DecoderLayer],
        norm: nn.Module,
        rope: RotaryEmbedding,
        max_seq_len: int,
    ) -> None:
        # the modules under their state-dict names; TransformerDecoder calls this too, after
        # registering its embedding (which keeps the embedding first in its state dict)
        self._dim = dim
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rope = rope
        self.max_seq_len = max_seq_len
        _ = self.condition_dim  # raises now if the norms disagree on the condition's width

    @property
    def dim(self) -> int:
        """Model width ``d``."""
        return self._dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def condition_dim(self) -> int | None:
        """Width ``c`` of the per-call ``condition`` the norms read; ``None``: they read none
        (and a condition is refused)."""
        dims = {layer.condition_dim for layer in self.layers} - {None}
        if isinstance(self.norm, ConditionedNorm):
            dims.add(self.norm.cond_dim)
        if len(dims) > 1:
            raise ValueError(
                f"the stack's norms read conditions of different widths {sorted(dims)}; one "
                f"condition reaches every norm, so build them with the same cond_dim"
            )
        return dims.pop() if dims else None

    def new_cache(self, max_len: int | None = None) -> GrowingKVCache | StaticKVCache:
        """An empty KV cache for this stack: a [`GrowingKVCache`][vlakit.decoders.GrowingKVCache]
        (``max_len=None``), or a [`StaticKVCache`][vlakit.decoders.StaticKVCache] of
        ``max_len`` positions (fixed shapes per step: a compiled decoder compiles once)."""
        if max_len is None:
            return GrowingKVCache(self.num_layers)
        return StaticKVCache(self.num_layers, max_len)

    def forward(
        self,
        embeds: Float[Tensor, "b q d"],
        mask: Bool[Tensor, "b q k"] | MaskSpec,
        positions: Int[Tensor, "b q"],
        cache: KVCache | None = None,
        start_layer: int = 0,
        end_layer: int | None = None,
        tap: AttentionTap | None = None,
        *,
        condition: Float[Tensor, "b c"] | Float[Tensor, "b q c"] | None = None,
        return_layers: Sequence[int] | None = None,
    ) -> Float[Tensor, "b q d"] | StackOutput:
        """Run layers ``[start_layer, end_layer)`` (all by default) and, when the range
        ends at the last layer, the final norm.

        Running a range lets a block sit between layers (a token pruner before layer ``k``:
        ``stack(x, m, p, end_layer=k)``, prune, ``stack(x', m', p', start_layer=k)``).

        Args:
            embeds: ``[b, q, d]`` input embeddings (hidden states when ``start_layer > 0``).
            mask: ``[b, q, k]`` boolean, ``True`` = may attend, ``k = cache.key_length(q)``
                (a mask narrower than a preallocated cache is padded with ``False``); or a
                [`MaskSpec`][vlakit.core.MaskSpec].
            positions: ``[b, q]`` RoPE positions, each ``< max_seq_len``.
            cache: optional [`KVCache`][vlakit.decoders.KVCache] for this stack's layers
                (written to unless read-only). An action expert may run against the cache
                its VLM filled: layer ``i`` attends to the VLM layer ``i``'s keys.
            start_layer: first layer to run.
            end_layer: one past the last layer to run (``None``: all).
            tap: an [AttentionTap][vlakit.core.AttentionTap] to fill with the attention
                weights of ``tap.layer`` (which must be in the range run) at its queries.
            condition: ``[b, c]`` (one per row) or ``[b, q, c]`` (one per token) for the
                norms that read it (``c = condition_dim``); required by them, refused
                without them.
            return_layers: layer indices (each in the range run) whose outputs to return
                too; see [`StackOutput`][vlakit.decoders.StackOutput].

        Returns:
            ``[b, q, d]`` hidden states (after the final norm if the last layer ran), or a
            [`StackOutput`][vlakit.decoders.StackOutput] ``(hidden, {i: [b, q, d]})`` when
            ``return_layers`` is given.
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
        wanted = self._check_return_layers(return_layers, start_layer, end)
        self._check_condition(embeds, condition)
        attn_mask = self._attention_mask(embeds, mask, positions, cache)
        cos, sin = self.rope(positions, embeds.dtype)
        x = embeds
        kept: dict[int, Tensor] = {}
        for i in range(start_layer, end):
            x = self._run_layer(i, x, cos, sin, attn_mask, cache, tap, condition)
            if i in wanted:
                kept[i] = x
        if end == self.num_layers:
            if cache is not None:
                cache.advance(embeds.shape[1])
            if isinstance(self.norm, ConditionedNorm):
                x, _ = self.norm(x, condition)  # a final norm's gate gates nothing
            else:
                x = self.norm(x)
        if return_layers is None:
            return x
        return StackOutput(x, kept)

    def _run_layer(
        self,
        i: int,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        tap: AttentionTap | None,
        condition: Tensor | None,
    ) -> Tensor:
        # the plain call (what compiled and sharded layers usually see) passes no keywords
        # it does not need
        layer = self.layers[i]
        tap = tap if tap is not None and i == tap.layer else None
        if condition is not None and layer.condition_dim is not None:
            return layer(x, cos, sin, mask, cache, i, tap, condition=condition)
        if tap is not None:
            return layer(x, cos, sin, mask, cache, i, tap)
        return layer(x, cos, sin, mask, cache, i)

    def _check_return_layers(self, return_layers: object, start: int, end: int) -> frozenset[int]:
        if return_layers is None:
            return frozenset()
        if isinstance(return_layers, (int, Tensor)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in return_layers
        ):
            raise TypeError(
                f"return_layers takes a sequence of layer indices such as (3, 7), got "
                f"{return_layers!r}"
            )
        bad = [i for i in return_layers if not start <= i < end]
        if bad:
            raise ValueError(
                f"return_layers asks for layer {bad[0]}, but this call runs layers "
                f"[{start}, {end}) of the stack's {self.num_layers} (valid: {start}.."
                f"{end - 1}; layer i is the output of layer i, before the final norm)"
            )
        return frozenset(return_layers)

    def _check_condition(self, embeds: Tensor, condition: Tensor | None) -> None:
        want = self.condition_dim
        if want is None:
            if condition is not None:
                raise ValueError(
                    f"a condition {tuple(condition.shape)} was given, but none of this "
                    f"{type(self).__name__}'s norms reads one, so it would be ignored; drop "
                    f"condition=, or build the stack with conditioned norms (e.g. "
                    f"norm=partial(AdaptiveRMSNorm, cond_dim={condition.shape[-1]}))"
                )
            return
        if condition is None:
            norm = next(
                type(n).__name__ for n in self.modules() if isinstance(n, ConditionedNorm)
            )
            raise ValueError(
                f"this {type(self).__name__}'s norms ({norm}) read a per-call condition of "
                f"width {want}, but condition= is missing: pass condition=[batch, {want}] "
                f"(pi0.5: the flow time's embedding)"
            )
        b, q = embeds.shape[:2]
        expected = f"[batch={b}, {want}] or [batch={b}, tokens={q}, {want}]"
        if condition.ndim not in (2, 3):
            raise ValueError(
                f"condition must be {expected}, got {condition.ndim} dimensions "
                f"{tuple(condition.shape)}"
            )
        if condition.shape[-1] != want:
            raise ValueError(
                f"condition has width {condition.shape[-1]}, but the stack's norms read width "
                f"{want}: condition must be {expected}"
            )
        if condition.shape[0] != b or (condition.ndim == 3 and condition.shape[1] != q):
            raise ValueError(
                f"condition is {tuple(condition.shape)}, but the embeddings are [batch={b}, "
                f"tokens={q}]: condition must be {expected}"
            )
        if not condition.is_floating_point():
            raise ValueError(f"condition must be a floating tensor, got {condition.dtype}")

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
        if cache is not None and cache.num_layers != self.num_layers:
            raise ValueError(
                f"the cache serves {cache.num_layers} layers but this {type(self).__name__} "
                f"has {self.num_layers}; use the stack's new_cache(), or a stack with as many "
                f"layers as the one that filled the cache"
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
