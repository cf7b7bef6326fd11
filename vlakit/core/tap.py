"""AttentionTap: one decoder layer's attention weights for a few chosen queries."""

import dataclasses

from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["AttentionTap"]


@dataclasses.dataclass
class AttentionTap:
    """Asks a decoder for the attention weights of one layer at chosen query tokens.

    The decoder keeps its fast attention (SDPA, fused kernels) for the layer's output and,
    in the tapped layer only, also computes ``softmax(q_i k^T * scale + mask)`` for the
    ``t`` queries asked for: ``O(b·h·t·n·hd)`` more work for ``n`` keys, against the
    layer's ``O(b·n·d²)``. With one query per row (a pruner reading the last prompt
    token) at ``n = 600``, ``d = 4096`` that is well under 0.1 % of the layer. The weights
    are computed in float32 and carry no gradient into the decoder's parameters beyond
    what autograd records (taps used by pruners are read under ``torch.no_grad`` at
    inference anyway).

    The decoder fills [weights][vlakit.core.AttentionTap] during the forward that was
    handed the tap; nothing else about the forward changes.

    Args:
        layer: the decoder layer whose attention is read (``0 .. num_layers - 1``).
        queries: ``[b, t]`` index of each query token in its row.

    Attributes:
        weights: ``[b, h, t, k]`` attention probabilities (float32) of the ``t`` queries
            over the layer's ``k`` keys, per query head ``h``; ``None`` until a forward
            filled it.
    """

    layer: int
    queries: Int[Tensor, "b t"]
    weights: Float[Tensor, "b h t k"] | None = None
