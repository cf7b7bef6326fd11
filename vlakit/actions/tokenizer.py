"""OpenVLA's uniform-bin action tokenizer, with every constant a constructor argument."""

from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlakit.actions._checks import as_tensor, check_finite, check_last_dim
from vlakit.core.recording import recorded

__all__ = ["ActionTokenizer"]


@recorded
class ActionTokenizer:
    """Maps continuous actions in ``[min_action, max_action]`` to the last ids of a vocabulary.

    The scheme is OpenVLA's, reproduced exactly:

    - ``bins = linspace(min_action, max_action, num_bins)`` (``num_bins`` edges, computed
      by numpy in float64) and ``centres = (bins[:-1] + bins[1:]) / 2`` (``num_bins - 1``
      centres);
    - encode: ``id = vocab_end - digitize(clip(a, min_action, max_action), bins)`` with
      numpy's ``digitize`` (``bins[i-1] <= x < bins[i]`` gives ``i``), so ids lie in
      ``[vocab_end - num_bins, vocab_end - 1]``: 31744…31999 for OpenVLA
      (``vocab_end=32000``, Llama-2's vocabulary without the pad token);
    - decode: ``centres[clip(vocab_end - id - 1, 0, num_bins - 2)]``.

    Only values clipped to exactly ``max_action`` reach the lowest id ``vocab_end - num_bins``;
    it decodes to the last centre, like its neighbour ``vocab_end - num_bins + 1``. Ids outside
    ``token_ids`` are clamped by decode exactly as in the reference (use
    ``is_action_token`` to detect them).

    Comparisons run in float64 whatever the input dtype (a float32 or bf16 value converts to
    float64 exactly), so bin membership matches numpy bit for bit, edges included. The only
    exception is Apple's ``mps`` device, which has no float64 and compares in float32.

    The object holds no tensors that need moving: the bins live on the CPU and are copied to
    the input's device on use (2 KiB). It is not an ``nn.Module`` and has no state dict.

    Args:
        vocab_end: one past the last action id; the tokenizer's base vocabulary size
            (``tokenizer.vocab_size``), 32000 for OpenVLA's Llama-2 tokenizer.
        action_dim: width ``a`` of the last axis of actions (7 for OpenVLA).
        num_bins: number of bin edges; ``num_bins - 1`` distinct decoded values.
        min_action: lower clipping bound (first edge).
        max_action: upper clipping bound (last edge).
        check_finite: raise on NaN or infinite actions in ``encode`` (skipped while
            ``torch.compile`` traces). With ``False``, NaN encodes as the reference does
            (to ``vocab_end - num_bins``) and ``±inf`` are clipped.
    """

    def __init__(
        self,
        vocab_end: int,
        action_dim: int,
        num_bins: int = 256,
        min_action: float = -1.0,
        max_action: float = 1.0,
        check_finite: bool = True,
    ) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2 (two edges, one bin), got {num_bins}")
        if action_dim < 1:
            raise ValueError(f"action_dim must be positive, got {action_dim}")
        if vocab_end < num_bins:
            raise ValueError(
                f"vocab_end={vocab_end} leaves no room for num_bins={num_bins} action ids: "
                f"they are the num_bins ids just below vocab_end, so vocab_end must be at "
                f"least num_bins"
            )
        if not (np.isfinite(min_action) and np.isfinite(max_action) and min_action < max_action):
            raise ValueError(
                f"need finite min_action < max_action, got min_action={min_action}, "
                f"max_action={max_action}"
            )
        self.vocab_end = int(vocab_end)
        self.action_dim = int(action_dim)
        self.num_bins = int(num_bins)
        self.min_action = float(min_action)
        self.max_action = float(max_action)
        self.check_finite = check_finite
        bins = np.linspace(self.min_action, self.max_action, self.num_bins)
        centres = (bins[:-1] + bins[1:]) / 2.0
        self._bins = torch.from_numpy(bins)  # float64 [num_bins], CPU
        self._centres = torch.from_numpy(centres)  # float64 [num_bins - 1], CPU

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        action_dim: int,
        num_bins: int = 256,
        min_action: float = -1.0,
        max_action: float = 1.0,
        check_finite: bool = True,
    ) -> "ActionTokenizer":
        """Build with ``vocab_end = tokenizer.vocab_size`` (OpenVLA's contract).

        ``tokenizer`` is anything with an integer ``vocab_size`` (a transformers tokenizer's
        ``vocab_size`` excludes added tokens such as OpenVLA's ``<PAD>``).
        """
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if not isinstance(vocab_size, int):
            raise TypeError(
                f"tokenizer must have an integer vocab_size, got {type(tokenizer).__name__} "
                f"with vocab_size={vocab_size!r}"
            )
        return cls(
            vocab_end=vocab_size,
            action_dim=action_dim,
            num_bins=num_bins,
            min_action=min_action,
            max_action=max_action,
            check_finite=check_finite,
        )

    @property
    def token_ids(self) -> range:
        """The ids encode can produce: ``range(vocab_end - num_bins, vocab_end)``."""
        return range(self.vocab_end - self.num_bins, self.vocab_end)

    @property
    def bins(self) -> Float[Tensor, " num_bins"]:
        """The ``num_bins`` bin edges (float64, CPU, a copy)."""
        return self._bins.clone()

    @property
    def bin_centers(self) -> Float[Tensor, " num_centres"]:
        """The ``num_bins - 1`` values decode returns (float64, CPU, a copy)."""
        return self._centres.clone()

    @property
    def bin_width(self) -> float:
        """Distance between neighbouring edges: ``(max_action - min_action) / (num_bins - 1)``."""
        return (self.max_action - self.min_action) / (self.num_bins - 1)

    def _table(self, table: Tensor, device: torch.device) -> Tensor:
        if device.type == "mps":  # no float64 there
            return table.to(device=device, dtype=torch.float32)
        return table.to(device=device)

    def encode(
        self, actions: Float[Tensor, "*batch a"] | Float[np.ndarray, "*batch a"]
    ) -> Int[Tensor, "*batch a"]:
        """Token ids ``[*batch, a]`` (int64) for actions ``[*batch, a]``.

        Values are clipped to ``[min_action, max_action]`` first. A numpy array is accepted
        and converted; the result is always a tensor, on the input's device.
        """
        actions = as_tensor(actions, "actions")
        check_last_dim(actions, self.action_dim, "actions", f"action_dim={self.action_dim}")
        if self.check_finite:
            check_finite(actions, "actions passed to ActionTokenizer.encode")
        bins = self._table(self._bins, actions.device)
        values = actions.to(bins.dtype).clamp(self.min_action, self.max_action)
        # np.digitize(x, bins) (right=False) returns i with bins[i-1] <= x < bins[i]; that is
        # torch.bucketize with right=True (torch's flag names the other side of the interval).
        index = torch.bucketize(values, bins, right=True)  # [*batch, a] in [1, num_bins]
        return self.vocab_end - index

    def decode(
        self,
        ids: Int[Tensor, "*batch a"] | Int[np.ndarray, "*batch a"],
        dtype: torch.dtype = torch.float32,
    ) -> Float[Tensor, "*batch a"]:
        """Actions ``[*batch, a]`` (bin centres, in ``dtype``) for token ids ``[*batch, a]``.

        Ids outside ``token_ids`` are clamped to the nearest end, as in the reference.
        Pass ``dtype=torch.float64`` for the reference's exact float64 values.
        """
        ids = as_tensor(ids, "ids")
        check_last_dim(ids, self.action_dim, "ids", f"action_dim={self.action_dim}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        centres = self._table(self._centres, ids.device)
        index = (self.vocab_end - 1 - ids.long()).clamp(0, self.num_bins - 2)
        return centres[index].to(dtype)

    def is_action_token(self, ids: Int[Tensor, "*shape"]) -> Bool[Tensor, "*shape"]:
        """``True`` where ``ids`` is one of ``token_ids`` (any shape)."""
        return (ids >= self.vocab_end - self.num_bins) & (ids < self.vocab_end)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_end={self.vocab_end}, action_dim={self.action_dim}, "
            f"num_bins={self.num_bins}, min_action={self.min_action}, "
            f"max_action={self.max_action})"
        )
