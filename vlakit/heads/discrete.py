"""OpenVLA's discrete action head: actions are tokens of the language model's vocabulary."""

from typing import Any, Protocol, runtime_checkable

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlakit.core import TokenRole
from vlakit.core.recording import recorded
from vlakit.heads.base import HeadTokens, ModelRunner, has_action_targets
from vlakit.heads.lm_loss import next_token_loss
from vlakit.heads.sampling import Sampling

__all__ = ["DiscreteActionHead", "ActionCodec"]


@runtime_checkable
class ActionCodec(Protocol):
    """What the head needs of an action tokenizer
    ([ActionTokenizer][vlakit.actions.ActionTokenizer] is one)."""

    action_dim: int
    token_ids: range  # the ids encode can produce

    def encode(self, actions: Tensor) -> Tensor:
        """Normalised actions ``[..., a]`` -> ids ``[..., a]``."""
        ...

    def decode(self, ids: Tensor) -> Tensor:
        """Ids ``[..., a]`` -> normalised actions ``[..., a]``."""
        ...


@recorded
class DiscreteActionHead(nn.Module):
    """Actions as ``chunk * action_dim`` vocabulary tokens, read from the LM head.

    - [loss][vlakit.heads.DiscreteActionHead.loss]: the normalised target actions
      ``[b, chunk, a]`` become token ids (OpenVLA's 256-bin tokenizer) and their
      embeddings, placed as the action slots (the interleaver appends ``</s>`` after them);
      cross-entropy of predicting each action
      token (and ``</s>`` when ``predict_eos``) from the hidden state before it; the number
      of targets is static, so the loss compiles without graph breaks.
    - [predict][vlakit.heads.DiscreteActionHead.predict]: greedy generation of
      ``num_action_tokens`` tokens with the KV cache, decoded back to normalised actions.

    The head has no parameters: it uses the decoder's embedding and LM head.

    Args:
        tokenizer: the action tokenizer (an [ActionCodec][vlakit.heads.ActionCodec], e.g.
            [ActionTokenizer][vlakit.actions.ActionTokenizer]).
        chunk_size: actions per prediction (OpenVLA: 1).
        predict_eos: also train on predicting ``</s>`` after the actions (OpenVLA: yes).
    """

    def __init__(self, tokenizer: ActionCodec, chunk_size: int = 1, predict_eos: bool = True):
        super().__init__()
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.action_dim = tokenizer.action_dim
        self.predict_eos = predict_eos

    @property
    def num_action_tokens(self) -> int:
        """Action tokens per example: ``chunk_size * action_dim``."""
        return self.chunk_size * self.action_dim

    @property
    def token_ids(self) -> range:
        """The vocabulary ids the head reads and writes (checked against the decoder)."""
        return self.tokenizer.token_ids

    def has_targets(self, inputs: Any) -> bool:
        return has_action_targets(inputs)

    def loss(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, ""]:
        """Next-token cross-entropy on the action tokens (and ``</s>``): one pass with the
        target actions' tokens as slots."""
        sampling.check_deterministic(type(self).__name__)
        ids = rearrange(self.tokenizer.encode(runner.target_actions()), "b c a -> b (c a)")
        hidden, seq = runner.run(HeadTokens(action_embeds=runner.embed_tokens(ids),
                                            action_ids=ids))
        roles = (TokenRole.ACTION, TokenRole.EOS) if self.predict_eos else (TokenRole.ACTION,)
        targets = seq.role_mask(*roles) & seq.is_suffix  # not an </s> id inside the prompt
        is_pad = runner.target_is_pad()
        if is_pad is not None:  # padded steps' tokens are not targets ([b, c] -> [b, n])
            slots = seq.role_mask(TokenRole.ACTION) & seq.is_suffix  # [b, n], c·a per row
            index = (slots.long().cumsum(1) - 1).clamp(0, ids.shape[1] - 1)  # slot k of row
            padded = torch.gather(is_pad.repeat_interleave(self.tokenizer.action_dim, 1), 1,
                                  index)
            targets = targets & ~(slots & padded)
        return next_token_loss(
            hidden,
            seq.token_ids,
            targets,
            runner.lm_logits,
            max_targets=self.num_action_tokens + int(self.predict_eos),
        )

    def predict(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, "b c a"]:
        """Greedy generation of the action tokens, decoded to normalised actions."""
        sampling.check_deterministic(type(self).__name__)
        return self.decode_tokens(runner.generate(self.num_action_tokens))

    def decode_tokens(self, ids: Int[Tensor, "b m"]) -> Float[Tensor, "b c a"]:
        """Generated ids ``[b, chunk*a]`` to normalised actions ``[b, chunk, a]`` (float32)."""
        if ids.shape[1] != self.num_action_tokens:
            raise ValueError(
                f"expected {self.num_action_tokens} action token ids per row (chunk_size "
                f"{self.chunk_size} x action_dim {self.action_dim}), got ids of shape "
                f"{tuple(ids.shape)}"
            )
        ids = rearrange(ids, "b (c a) -> b c a", c=self.chunk_size)
        return self.tokenizer.decode(ids).to(torch.float32)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, action_dim={self.action_dim}"
