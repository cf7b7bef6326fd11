"""Language vectors: the prompt summarised as one vector ``[b, d]``, FiLM's condition.

A model whose vision encoder has FiLM layers (OpenVLA-OFT) conditions them on a vector
computed from the prompt's input embeddings. Which tokens are averaged is a rule of the
model family, so it is a block passed to [VLA][vlakit.VLA] (``language_vector=``), not a
flag inside it:

- [PromptMean][vlakit.language.PromptMean]: the mean of the real prompt tokens' input
  embeddings (padding excluded);
- [OFTLanguageVector][vlakit.language.OFTLanguageVector]: OpenVLA-OFT's, the mean over
  ``<s>``, every prompt column (padding included, as in its padded training batches) and
  ``</s>``: every non-slot text token of its sequence.
"""

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core.recording import recorded

__all__ = ["LanguageVector", "PromptMean", "OFTLanguageVector"]

EmbedFn = Callable[[Tensor], Tensor]


@runtime_checkable
class LanguageVector(Protocol):
    """The contract: ``module(embed_tokens, input_ids, text_valid) -> [b, d]``, where
    ``embed_tokens`` is the decoder's token embedding."""

    def __call__(
        self,
        embed_tokens: EmbedFn,
        input_ids: Int[Tensor, "b t"],
        text_valid: Bool[Tensor, "b t"],
    ) -> Float[Tensor, "b d"]:
        ...


@recorded
class PromptMean(nn.Module):
    """The mean of the real prompt tokens' input embeddings ``[b, d]`` (padding excluded;
    an all-padding row gives zeros)."""

    def forward(
        self,
        embed_tokens: EmbedFn,
        input_ids: Int[Tensor, "b t"],
        text_valid: Bool[Tensor, "b t"],
    ) -> Float[Tensor, "b d"]:
        embeds = embed_tokens(input_ids)  # [b, t, d]
        weights = text_valid.to(embeds.dtype)[..., None]  # [b, t, 1]
        return (embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@recorded
class OFTLanguageVector(nn.Module):
    """OpenVLA-OFT's FiLM vector: the mean of the input embeddings of ``<s>``, every prompt
    column (padding included, with the batch's pad id, as OFT's padded batches average
    it) and ``</s>``.

    Args:
        bos_id: ``<s>`` (Llama: 1).
        eos_id: ``</s>`` (Llama: 2).
    """

    def __init__(self, bos_id: int, eos_id: int) -> None:
        super().__init__()
        self.bos_id, self.eos_id = bos_id, eos_id

    def forward(
        self,
        embed_tokens: EmbedFn,
        input_ids: Int[Tensor, "b t"],
        text_valid: Bool[Tensor, "b t"],
    ) -> Float[Tensor, "b d"]:
        b = input_ids.shape[0]
        ends = [torch.full((b, 1), token, dtype=input_ids.dtype, device=input_ids.device)
                for token in (self.bos_id, self.eos_id)]
        ids = torch.cat((ends[0], input_ids, ends[1]), 1)  # [b, t + 2]
        return embed_tokens(ids).mean(1)

    def extra_repr(self) -> str:
        return f"bos_id={self.bos_id}, eos_id={self.eos_id}"
