"""Key/value cache for the own decoder: append, preallocated, and read-only prefix views."""

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Per-layer keys and values ``[b, h_kv, n, hd]``.

    Three uses:

    1. **Append** (``KVCache(num_layers)``): each forward's keys and values are appended
       with ``torch.cat``, so the next call only feeds the new tokens. The key count grows,
       so a compiled decoder recompiles for every new length.
    2. **Preallocated** (``KVCache(num_layers, max_len=N)``): buffers of ``N`` slots are
       allocated on the first write and filled in place at a write index kept as a tensor.
       Attention always sees all ``N`` slots, so every generation step has the same shapes
       and a compiled decoder compiles once; the mask must give ``False`` to slots not yet
       written (a mask narrower than ``N`` is padded with ``False`` by the decoder).
    3. **Read-only prefix** (diffusion and flow-matching heads): fill a cache once with the
       prefix, then call [`read_only`][vlakit.decoders.KVCache.read_only] and run as many
       different suffixes as needed against the view. Each suffix attends to
       ``prefix + itself``; nothing is stored, so the prefix stays exactly as it was. A plain
       view concatenates the prefix with each suffix's keys (a copy of the prefix per layer
       and step); [`suffix_view`][vlakit.decoders.KVCache.suffix_view] reserves slots for the
       suffix after the prefix once, and every step overwrites only those slots.

    The mask given to the decoder with a cache covers all keys it will attend:
    ``[b, q, key_length(q)]``.

    Args:
        num_layers: number of decoder layers the cache serves.
        max_len: preallocate this many positions (use 2); ``None`` appends (use 1).
    """

    def __init__(self, num_layers: int, max_len: int | None = None) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.is_read_only = False
        self.max_len = max_len
        self.index: Tensor | None = None  # preallocated: next write slot, a 0-d long tensor
        self.length = 0  # append mode: positions every layer holds (advanced per forward)
        self.suffix_slots = 0  # suffix view: slots reserved after the prefix

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def is_preallocated(self) -> bool:
        return self.max_len is not None

    @property
    def _writes_in_place(self) -> bool:
        """A preallocated cache that stores (not a read-only view of one)."""
        return self.max_len is not None and not self.is_read_only

    def __len__(self) -> int:
        """Number of key slots attention sees before new tokens are added: the cached
        positions (append mode) or ``max_len`` (preallocated, once written)."""
        if self._writes_in_place:
            return 0 if self.keys[0] is None else self.max_len
        return self.length

    def filled(self) -> int:
        """Positions written so far (reads the write index back in preallocated mode)."""
        if self._writes_in_place:
            return 0 if self.index is None else int(self.index)
        return self.length

    def key_length(self, new_tokens: int) -> int:
        """Keys attention sees when ``new_tokens`` are added: the mask's last dimension."""
        if self._writes_in_place:
            return self.max_len
        return len(self) + new_tokens

    def _suffix_update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # suffix view: write the suffix into the slots after the prefix, attend to a view
        n, q = self.length, k.shape[-2]
        keys, values = self.keys[layer], self.values[layer]
        recording = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        if q > self.suffix_slots or recording:
            # more tokens than reserved, or a backward to keep: concatenate (copies)
            return torch.cat((keys[:, :, :n], k), -2), torch.cat((values[:, :, :n], v), -2)
        keys[:, :, n : n + q].copy_(k)
        values[:, :, n : n + q].copy_(v)
        return keys[:, :, : n + q], values[:, :, : n + q]

    def update(
        self, layer: int, k: Float[Tensor, "b h q hd"], v: Float[Tensor, "b h q hd"]
    ) -> tuple[Float[Tensor, "b h kv hd"], Float[Tensor, "b h kv hd"]]:
        """Return the keys/values to attend to at ``layer``: cached ones and ``k``, ``v``.

        Stores them unless this is a read-only view. Preallocated caches write at the write
        index; [`advance`][vlakit.decoders.KVCache.advance] moves it after all layers ran.
        """
        old_k, old_v = self.keys[layer], self.values[layer]
        if self.suffix_slots and old_k is not None and old_k.shape[0] == k.shape[0]:
            return self._suffix_update(layer, k, v)
        if old_k is not None and old_k.shape[0] != k.shape[0]:
            raise ValueError(
                f"cache batch size is {old_k.shape[0]} but the new tokens have batch "
                f"{k.shape[0]}; use KVCache.expand_batch to share one prefix"
            )
        if self._writes_in_place:
            if old_k is None:
                b, h, _, hd = k.shape
                old_k = k.new_zeros(b, h, self.max_len, hd)
                old_v = v.new_zeros(b, h, self.max_len, hd)
                self.keys[layer], self.values[layer] = old_k, old_v
                if self.index is None:
                    self.index = torch.zeros((), dtype=torch.long, device=k.device)
            slots = self.index + torch.arange(k.shape[-2], device=k.device)  # [q]
            old_k.index_copy_(2, slots, k)
            old_v.index_copy_(2, slots, v)
            return old_k, old_v
        if old_k is not None:
            k = torch.cat((old_k, k), dim=-2)
            v = torch.cat((old_v, v), dim=-2)
        if not self.is_read_only:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, new_tokens: int) -> None:
        """Count ``new_tokens`` more cached positions (the decoder calls this once per
        forward, after its last layer, so a forward split into layer ranges sees the same
        cached length in every layer). A preallocated cache moves its write index."""
        if self.is_read_only:
            return
        if self.is_preallocated:
            if self.index is not None:
                self.index.add_(new_tokens)
        else:
            self.length += new_tokens

    def read_only(self) -> "KVCache":
        """A view sharing this cache's tensors that never stores anything.

        A preallocated cache gives a view of the positions written so far.
        """
        view = KVCache(self.num_layers)
        n = self.filled()
        if self.is_preallocated:
            view.keys = [None if k is None else k[:, :, :n] for k in self.keys]
            view.values = [None if v is None else v[:, :, :n] for v in self.values]
        else:
            view.keys, view.values = list(self.keys), list(self.values)
        view.length = n
        view.is_read_only = True
        return view

    def suffix_view(self, suffix_slots: int, repeats: int = 1) -> "KVCache":
        """A read-only view of the prefix with ``suffix_slots`` reserved after it.

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
        n = self.filled()
        view = KVCache(self.num_layers)
        for store, target in ((self.keys, view.keys), (self.values, view.values)):
            for layer, cached in enumerate(store):
                if cached is None:
                    continue
                b, h, _, hd = cached.shape
                buffer = cached.new_zeros(b, repeats, h, n + suffix_slots, hd)
                buffer[:, :, :, :n].copy_(cached[:, None, :, :n])  # broadcast: one copy
                target[layer] = rearrange(buffer, "b r h n hd -> (b r) h n hd")
        view.length = n
        view.suffix_slots = suffix_slots
        view.is_read_only = True
        return view

    def expand_batch(self, repeats: int) -> "KVCache":
        """A read-only view whose batch is every cached row repeated ``repeats`` times.

        Lets ``b * repeats`` suffixes (e.g. several noise samples per observation) share one
        prefix filled at batch ``b``.
        """
        view = self.read_only()
        view.keys = [None if k is None else k.repeat_interleave(repeats, 0) for k in view.keys]
        view.values = [
            None if v is None else v.repeat_interleave(repeats, 0) for v in view.values
        ]
        return view
