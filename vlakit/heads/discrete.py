"""OpenVLA's discrete action head: actions are tokens of the language model's vocabulary."""

from collections.abc import Callable

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlakit.actions import ActionTokenizer
from vlakit.core import TokenRole, TokenSequence
from vlakit.heads.lm_loss import next_token_loss

__all__ = ["DiscreteActionHead"]


class DiscreteActionHead(nn.Module):
    """Actions as ``chunk * action_dim`` vocabulary tokens, read from the LM head.

    - Training: :meth:`action_slots` turns normalised actions ``[b, chunk, a]`` into token
      ids (OpenVLA's 256-bin tokenizer) and their embeddings; :meth:`loss` is the
      cross-entropy of predicting each action token (and ``</s>`` when ``predict_eos``) from
      the hidden state before it.
    - Prediction: the model greedily generates :attr:`num_tokens` tokens with the KV cache and
      :meth:`decode_tokens` maps them back to normalised actions ``[b, chunk, a]``.

    The head has no parameters: it uses the decoder's embedding and LM head.

    Args:
        tokenizer: the :class:`~vlakit.actions.ActionTokenizer`.
        chunk_size: actions per prediction (OpenVLA: 1).
        predict_eos: also train on predicting ``</s>`` after the actions (OpenVLA: yes).
    """

    def __init__(
        self, tokenizer: ActionTokenizer, chunk_size: int = 1, predict_eos: bool = True
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.action_dim = tokenizer.action_dim
        self.predict_eos = predict_eos

    @property
    def num_tokens(self) -> int:
        """Action tokens per example: ``chunk_size * action_dim``."""
        return self.chunk_size * self.action_dim

    def check_actions(self, actions: Tensor) -> None:
        """Raise a ``ValueError`` naming the dimension if ``actions`` is not ``[b, chunk, a]``."""
        expected = (self.chunk_size, self.action_dim)
        if actions.dim() != 3 or tuple(actions.shape[1:]) != expected:
            raise ValueError(
                f"actions must be [batch, chunk={self.chunk_size}, action_dim={self.action_dim}]"
                f", got shape {tuple(actions.shape)}"
            )

    def action_slots(
        self,
        actions: Float[Tensor, "b c a"],
        embed_tokens: Callable[[Tensor], Tensor],
    ) -> tuple[Float[Tensor, "b m d"], Int[Tensor, "b m"]]:
        """Slot embeddings and ids for normalised ``actions [b, chunk, a]`` (``m = chunk*a``)."""
        self.check_actions(actions)
        ids = rearrange(self.tokenizer.encode(actions), "b c a -> b (c a)")
        return embed_tokens(ids), ids

    def loss(
        self,
        hidden: Float[Tensor, "b n d"],
        seq: TokenSequence,
        logits_fn: Callable[[Tensor], Tensor],
    ) -> Float[Tensor, ""]:
        """Next-token cross-entropy on the action tokens (and ``</s>``)."""
        roles = (TokenRole.ACTION, TokenRole.EOS) if self.predict_eos else (TokenRole.ACTION,)
        return next_token_loss(hidden, seq.token_ids, seq.role_mask(*roles), logits_fn)

    def decode_tokens(self, ids: Int[Tensor, "b m"]) -> Float[Tensor, "b c a"]:
        """Generated ids ``[b, chunk*a]`` to normalised actions ``[b, chunk, a]`` (float32)."""
        if ids.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} action tokens, got {ids.shape[1]}")
        ids = rearrange(ids, "b (c a) -> b c a", c=self.chunk_size)
        return self.tokenizer.decode(ids).to(torch.float32)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, action_dim={self.action_dim}"
