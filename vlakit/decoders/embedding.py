"""Token embedding with Gemma's optional sqrt(d) scale."""

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = ["TokenEmbedding"]


class TokenEmbedding(nn.Embedding):
    """``ids [b, t] -> embeddings [b, t, d]``, optionally multiplied by ``sqrt(d)``.

    Gemma scales text embeddings by ``sqrt(d)``; as in transformers the factor is rounded to
    the embedding dtype before the multiply (``sqrt(2048)`` in bf16 is 45.25, not 45.2548).

    Args:
        vocab_size: number of rows ``V``.
        dim: width ``d``.
        scale_by_sqrt_dim: multiply by ``sqrt(d)`` (Gemma).
        padding_idx: passed to :class:`torch.nn.Embedding`.
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
        out = super().forward(ids)
        if self.scale_by_sqrt_dim:
            out = out * torch.tensor(self.embedding_dim**0.5, dtype=out.dtype)
        return out
