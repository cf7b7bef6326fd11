"""Key/value caches for the own decoder stacks: one small class per mode.

- [`GrowingKVCache`][vlakit.decoders.GrowingKVCache]: appends each forward's keys and values
  (``torch.cat``); the key count grows.
- [`StaticKVCache`][vlakit.decoders.StaticKVCache]: preallocated buffers written in place at
  a write index kept as a tensor; every step has the same shapes (a compiled decoder
  compiles once).
- [`PrefixKVView`][vlakit.decoders.PrefixKVView]: a read-only view of a filled prefix (rows
  repeated or not); each suffix attends to ``prefix + itself`` and nothing is stored.
- [`SuffixKVView`][vlakit.decoders.SuffixKVView]: a read-only prefix copied once into
  buffers with slots reserved after it; each suffix overwrites only those slots.

All four share the interface of [`KVCache`][vlakit.decoders.KVCache], which is what the
attention layers and the stacks call (``update``, ``advance``, ``key_length``) and what the
runner calls to derive views (``read_only``, ``suffix_view``, ``expand_batch``). transformers
splits its caches the same way (``DynamicLayer``, ``StaticLayer``).
"""

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

__all__ = ["KVCache", "GrowingKVCache", "StaticKVCache", "PrefixKVView", "SuffixKVView"]


class KVCache:
    """The interface every KV cache of the own decoder offers: per-layer keys and values
    ``[b, h_kv, n, hd]`` in ``keys`` and ``values`` (``None`` until a layer wrote).

    Not built directly: [`GrowingKVCache`][vlakit.decoders.GrowingKVCache] (appending),
    [`StaticKVCache`][vlakit.decoders.StaticKVCache] (preallocated) or
    ``decoder.new_cache(max_len=...)``; the read-only views come from
    [`read_only`][vlakit.decoders.KVCache.read_only],
    [`expand_batch`][vlakit.decoders.KVCache.expand_batch] and
    [`suffix_view`][vlakit.decoders.KVCache.suffix_view].

    The mask given to a decoder with a cache covers all keys it will attend:
    ``[b, q, key_length(q)]``.

    Attributes:
        is_read_only: the cache never stores (a view of a prefix).
        is_preallocated: attention sees a fixed number of slots, written or not (the decoder
            pads a narrower mask with ``False``).
    """

    is_read_only: bool = False
    is_preallocated: bool = False

    def __new__(cls, *args, **kwargs):
        if cls is KVCache:
            raise TypeError(
                "KVCache is the interface the cache classes share and is not built itself: "
                "use GrowingKVCache(num_layers) (appends), StaticKVCache(num_layers, max_len) "
                "(preallocated), or decoder.new_cache(max_len=None or N)"
            )
        return super().__new__(cls)

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"a KV cache serves at least one layer, got num_layers={num_layers}")
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def __len__(self) -> int:
        """Key slots attention sees before new tokens are added."""
        raise NotImplementedError

    def filled(self) -> int:
        """Positions written so far (the prefix a view derived now would hold)."""
        raise NotImplementedError

    def key_length(self, new_tokens: int) -> int:
        """Keys attention sees when ``new_tokens`` are added: the mask's last dimension."""
        return len(self) + new_tokens

    def update(
        self, layer: int, k: Float[Tensor, "b h q hd"], v: Float[Tensor, "b h q hd"]
    ) -> tuple[Float[Tensor, "b h kv hd"], Float[Tensor, "b h kv hd"]]:
        """Return the keys/values to attend to at ``layer``: the cached ones and ``k``, ``v``
        (stored unless the cache is read-only)."""
        raise NotImplementedError

    def advance(self, new_tokens: int) -> None:
        """Count ``new_tokens`` more cached positions. The decoder calls this once per
        forward, after its last layer, so a forward split into layer ranges sees the same
        cached length in every layer. A read-only view ignores it."""

    def _check_batch(self, layer: int, k: Tensor) -> None:
        cached = self.keys[layer]
        if cached is not None and cached.shape[0] != k.shape[0]:
            raise ValueError(
                f"cache batch size is {cached.shape[0]} but the new tokens have batch "
                f"{k.shape[0]}; use KVCache.expand_batch (or suffix_view(..., repeats)) to "
                f"share one prefix among several rows"
            )

    def _prefix(self) -> tuple[list[Tensor | None], list[Tensor | None], int]:
        """The written positions of every layer (views, no copy) and their count."""
        n = self.filled()
        keys = [None if k is None else k[:, :, :n] for k in self.keys]
        values = [None if v is None else v[:, :, :n] for v in self.values]
        return keys, values, n

    def read_only(self) -> "PrefixKVView":
        """A [`PrefixKVView`][vlakit.decoders.PrefixKVView] sharing this cache's tensors (the
        positions written so far) that never stores anything."""
        keys, values, n = self._prefix()
        return PrefixKVView(keys, values, n)

    def expand_batch(self, repeats: int) -> "PrefixKVView":
        """A read-only [`PrefixKVView`][vlakit.decoders.PrefixKVView] whose batch is every
        cached row repeated ``repeats`` times (``repeat_interleave``: row ``i`` becomes rows
        ``i * repeats ... i * repeats + repeats - 1``).

        Lets ``b * repeats`` suffixes (e.g. several noise samples per observation) share one
        prefix filled at batch ``b``.
        """
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        keys, values, n = self._prefix()
        keys = [None if k is None else k.repeat_interleave(repeats, 0) for k in keys]
        values = [None if v is None else v.repeat_interleave(repeats, 0) for v in values]
        return PrefixKVView(keys, values, n)

    def suffix_view(self, suffix_slots: int, repeats: int = 1) -> "SuffixKVView":
        """A read-only [`SuffixKVView`][vlakit.decoders.SuffixKVView] of the prefix with
        ``suffix_slots`` reserved after it.

        The prefix is copied once into buffers of ``prefix + suffix_slots`` positions (every
        row ``repeats`` times, as [expand_batch][vlakit.decoders.KVCache.expand_batch]); each
        suffix run then writes its keys and values into the reserved slots in place and
        attends to ``prefix + suffix`` through a view. Fifty diffusion steps cost one prefix
        and one suffix of memory, and no per-step copy of the prefix. While autograd records
        (training through the cache) a run concatenates instead, as a plain read-only view.
        """
        if suffix_slots < 1:
            raise ValueError(f"suffix_slots must be >= 1, got {suffix_slots}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        keys, values, n = self._prefix()
        buffers: tuple[list[Tensor | None], list[Tensor | None]] = ([], [])
        for store, target in ((keys, buffers[0]), (values, buffers[1])):
            for cached in store:
                if cached is None:
                    target.append(None)
                    continue
                b, h, _, hd = cached.shape
                buffer = cached.new_zeros(b, repeats, h, n + suffix_slots, hd)
                buffer[:, :, :, :n].copy_(cached[:, None])  # broadcast over repeats: one copy
                target.append(rearrange(buffer, "b r h n hd -> (b r) h n hd"))
        return SuffixKVView(buffers[0], buffers[1], n, suffix_slots)


class GrowingKVCache(KVCache):
    """Appends each forward's keys and values with ``torch.cat``, so the next call only
    feeds the new tokens. The key count grows, so a compiled decoder recompiles for every
    new length (use [`StaticKVCache`][vlakit.decoders.StaticKVCache] for compiled steps).

    Args:
        num_layers: number of decoder layers the cache serves.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self.length = 0  # positions every layer holds (advanced once per forward)

    def __len__(self) -> int:
        return self.length

    def filled(self) -> int:
        return self.length

    def update(
        self, layer: int, k: Float[Tensor, "b h q hd"], v: Float[Tensor, "b h q hd"]
    ) -> tuple[Float[Tensor, "b h kv hd"], Float[Tensor, "b h kv hd"]]:
        """Append ``k``, ``v`` at ``layer``; return all keys and values of that layer."""
        self._check_batch(layer, k)
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None:
            k = torch.cat((old_k, k), dim=-2)
            v = torch.cat((old_v, v), dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


class StaticKVCache(KVCache):
    """Buffers of ``max_len`` slots, allocated on the first write and filled in place at a
    write index kept as a tensor (no host read on the hot path).

    Attention always sees all ``max_len`` slots, so every generation step has the same
    shapes and a compiled decoder compiles once; the mask must give ``False`` to slots not
    yet written (a mask narrower than ``max_len`` is padded with ``False`` by the decoder).

    Args:
        num_layers: number of decoder layers the cache serves.
        max_len: slots per layer.
    """

    is_preallocated = True

    def __init__(self, num_layers: int, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"a preallocated cache needs max_len >= 1 slots, got {max_len}")
        super().__init__(num_layers)
        self.max_len = max_len
        self.index: Tensor | None = None  # the next write slot, a 0-d long tensor

    def __len__(self) -> int:
        """``max_len`` once written (attention sees every slot), else 0."""
        return 0 if self.keys[0] is None else self.max_len

    def filled(self) -> int:
        """Positions written so far (reads the write index back)."""
        return 0 if self.index is None else int(self.index)

    def key_length(self, new_tokens: int) -> int:
        return self.max_len

    def update(
        self, layer: int, k: Float[Tensor, "b h q hd"], v: Float[Tensor, "b h q hd"]
    ) -> tuple[Float[Tensor, "b h kv hd"], Float[Tensor, "b h kv hd"]]:
        """Write ``k``, ``v`` at the write index; return the whole ``max_len`` buffers
        ([`advance`][vlakit.decoders.KVCache.advance] moves the index after all layers)."""
        self._check_batch(layer, k)
        keys, values = self.keys[layer], self.values[layer]
        if keys is None:
            b, h, _, hd = k.shape
            keys = k.new_zeros(b, h, self.max_len, hd)
            values = v.new_zeros(b, h, self.max_len, hd)
            self.keys[layer], self.values[layer] = keys, values
            if self.index is None:
                self.index = torch.zeros((), dtype=torch.long, device=k.device)
        slots = self.index + torch.arange(k.shape[-2], device=k.device)  # [q]
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
        return keys, values

    def advance(self, new_tokens: int) -> None:
        if self.index is not None:
            self.index.add_(new_tokens)


class PrefixKVView(KVCache):
    """A read-only view of a filled prefix: each run attends to ``prefix + its own keys``
    (concatenated, a copy of the prefix per layer and run) and nothing is stored, so the
    prefix stays exactly as it was and any number of suffixes can run against it.

    Made by [`read_only`][vlakit.decoders.KVCache.read_only] or
    [`expand_batch`][vlakit.decoders.KVCache.expand_batch].

    Args:
        keys: per-layer prefix keys ``[b, h_kv, n, hd]`` (``None`` for an unwritten layer).
        values: likewise values.
        length: prefix positions ``n``.
    """

    is_read_only = True

    def __init__(
        self, keys: list[Tensor | None], values: list[Tensor | None], length: int
    ) -> None:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} layers of keys but {len(values)} of values")
        super().__init__(len(keys))
        self.keys, self.values = list(keys), list(values)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def filled(self) -> int:
        return self.length

    def update(
        self, layer: int, k: Float[Tensor, "b h q hd"], v: Float[Tensor, "b h q hd"]
    ) -> tuple[Float[Tensor, "b h kv hd"], Float[Tensor, "b h kv hd"]]:
        """``prefix + k`` and ``prefix + v`` at ``layer``; nothing is stored."""
        self._check_batch(layer, k)
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is None:
            return k, v
        return torch.cat((old_k, k), dim=-2), torch.cat((old_v, v), dim=-2)


class SuffixKVView(PrefixKVView):
    """A read-only prefix copied once into buffers of ``prefix + suffix_slots`` positions;
    each run writes its keys and values into the reserved slots after the prefix, in place,
    and attends to ``prefix + suffix`` through a view of the buffer. The prefix part is
    never written, so every run sees the prefix as it was encoded.

    A run with more tokens than ``suffix_slots``, or one while autograd records (training
    through the cache), concatenates instead (as [`PrefixKVView`][vlakit.decoders.PrefixKVView]).

    Made by [`suffix_view`][vlakit.decoders.KVCache.suffix_view].

    Args:
        keys: per-layer buffers ``[b, h_kv, n + suffix_slots, hd]`` holding the prefix in
            their first ``n`` positions.
        values: likewise values.
        length: prefix positions ``n``.
        suffix_slots: positions reserved after the prefix.
    """

    def __init__(
        self,
        keys: list[Tensor | None],
        values: list[Tensor | None],
        length: int,
        suffix_slots: int,
    ) -> None:
        super().__init__(keys, values, length)
        self.suffix_slots = suffix_slots

    def update(
        self, layer: int, k: Float[Tensor, "b h q hd"], v: Float[Tensor, "b h q hd"]
    ) -> tuple[Float[Tensor, "b h kv hd"], Float[Tensor, "b h kv hd"]]:
        """Write ``k``, ``v`` into the reserved slots; return ``prefix + suffix`` views."""
        self._check_batch(layer, k)
        keys, values = self.keys[layer], self.values[layer]
        if keys is None:
            return k, v
        n, q = self.length, k.shape[-2]
        recording = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        if q > self.suffix_slots or recording:
            # more tokens than reserved, or a backward to keep: concatenate (copies)
            return torch.cat((keys[:, :, :n], k), -2), torch.cat((values[:, :, :n], v), -2)
        keys[:, :, n : n + q].copy_(k)
        values[:, :, n : n + q].copy_(v)
        return keys[:, :, : n + q], values[:, :, : n + q]
