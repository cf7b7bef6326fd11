"""Key/value cache for the own decoder: append-one-token generation and a read-only prefix."""

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Per-layer keys and values ``[b, h_kv, n, hd]``, grown along ``n``.

    Two uses:

    1. **Append** (generation): pass the cache to every forward; each call's keys and values
       are appended, so the next call only feeds the new tokens.
    2. **Read-only prefix** (diffusion and flow-matching heads): fill the cache once with the
       prefix, then call :meth:`read_only` and run as many different suffixes as needed
       against the view. Each suffix attends to ``prefix + itself``; nothing is stored, so the
       prefix stays exactly as it was.

    The mask given to the decoder with a cache covers all keys: ``[b, q, cached + q]``.

    Args:
        num_layers: number of decoder layers the cache serves.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.is_read_only = False

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def __len__(self) -> int:
        """Number of cached positions (0 when empty)."""
        k = self.keys[0]
        return 0 if k is None else k.shape[-2]

    def update(
        self, layer: int, k: Float[Tensor, "b h q hd"], v: Float[Tensor, "b h q hd"]
    ) -> tuple[Float[Tensor, "b h kv hd"], Float[Tensor, "b h kv hd"]]:
        """Return the keys/values to attend to at ``layer``: cached ones followed by ``k``, ``v``.

        Appends them to the cache unless this is a read-only view.
        """
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None:
            if old_k.shape[0] != k.shape[0]:
                raise ValueError(
                    f"cache batch size is {old_k.shape[0]} but the new tokens have batch "
                    f"{k.shape[0]}; use KVCache.expand_batch to share one prefix"
                )
            k = torch.cat((old_k, k), dim=-2)
            v = torch.cat((old_v, v), dim=-2)
        if not self.is_read_only:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def read_only(self) -> "KVCache":
        """A view sharing this cache's tensors that never stores anything."""
        view = KVCache(self.num_layers)
        view.keys, view.values = list(self.keys), list(self.values)
        view.is_read_only = True
        return view

    def expand_batch(self, repeats: int) -> "KVCache":
        """A read-only view whose batch is every cached row repeated ``repeats`` times.

        Lets ``b * repeats`` suffixes (e.g. several noise samples per observation) share one
        prefix filled at batch ``b``.
        """
        view = self.read_only()
        view.keys = [None if k is None else k.repeat_interleave(repeats, 0) for k in self.keys]
        view.values = [None if v is None else v.repeat_interleave(repeats, 0) for v in self.values]
        return view
