"""Token embedding with Gemma's optional sqrt(d) scale."""

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlakit.core.checks import should_validate
from vlakit.core.recording import recorded

__all__ = ["TokenEmbedding", "check_token_ids"]


@recorded
class TokenEmbedding(nn.Embedding):
    """``ids [b, t] -> embeddings [b, t, d]``, optionally multiplied by ``sqrt(d)``.

    Gemma scales text embeddings by ``sqrt(d)``; as in transformers the factor is rounded to
    the embedding dtype before the multiply (``sqrt(2048)`` in bf16 is 45.25, not 45.2548).

    Args:
        vocab_size: number of rows ``V``.
        dim: width ``d``.
        scale_by_sqrt_dim: multiply by ``sqrt(d)`` (Gemma).
        padding_idx: passed to `torch.nn.Embedding`.
        init_std: standard deviation of the random initialisation.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        scale_by_sqrt_dim: bool = False,
        padding_idx: int | None = None,
        init_std: float = 0.02,
    ) -> None:
        self.init_std = init_std
        super().__init__(vocab_size, dim, padding_idx=padding_idx)
        self.scale_by_sqrt_dim = scale_by_sqrt_dim

    def reset_parameters(self) -> None:
        # N(0, init_std) as transformers initialises Llama/Gemma (torch's default is N(0, 1),
        # which with a tied, sqrt(d)-scaled head gives huge initial logits).
        nn.init.normal_(self.weight, std=self.init_std)
        self._fill_padding_idx_with_zero()

    def forward(self, ids: Int[Tensor, "*batch"]) -> Float[Tensor, "*batch d"]:
        """Embed ``ids``; an id outside ``[0, V)`` raises a ``ValueError`` naming it and ``V``
        (a value check: see [`validation`][vlakit.core.validation])."""
        if should_validate(ids) and ids.numel():
            check_token_ids(ids, self.num_embeddings)
        out = super().forward(ids)
        if self.scale_by_sqrt_dim:
            out = out * torch.tensor(self.embedding_dim**0.5, dtype=out.dtype)
        return out


def check_token_ids(ids: Tensor, vocab_size: int, what: str = "token id") -> None:
    """Raise a ``ValueError`` if any of ``ids`` is outside ``[0, vocab_size)`` (reads back)."""
    low, high = torch.aminmax(ids)
    low, high = int(low), int(high)
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"{what} {bad} is outside the decoder's vocabulary of {vocab_size} tokens "
            f"(valid ids: 0..{vocab_size - 1}; ids in this batch span {low}..{high})"
        )
