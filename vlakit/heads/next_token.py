"""The VLM's head: next-token cross-entropy on the suffix text (PaliGemma)."""

from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core import TokenRole
from vlakit.core.recording import recorded
from vlakit.heads.base import HeadTokens, ModelRunner
from vlakit.heads.lm_loss import next_token_loss
from vlakit.heads.sampling import Sampling

__all__ = ["NextTokenHead"]


@recorded
class NextTokenHead(nn.Module):
    """Language modelling on the suffix: the loss of a vision-language model.

    Targets are the suffix text tokens and ``</s>`` (``token_type_ids == 1`` in PaliGemma's
    processor), each predicted from the hidden state before it, as transformers computes
    the loss from ``labels``. The head places no tokens and predicts no actions: text
    comes from [VLA.generate][vlakit.VLA.generate].

    Args:
        roles: the roles of target tokens among the suffix (default: text and ``</s>``).
    """

    def __init__(self, roles: tuple[TokenRole, ...] = (TokenRole.TEXT, TokenRole.EOS)) -> None:
        super().__init__()
        self.roles = tuple(roles)

    def has_targets(self, inputs: Any) -> bool:
        """A batch with a prefix/suffix split (``token_type_ids``) has suffix targets."""
        return getattr(inputs, "token_type_ids", None) is not None

    def loss(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, ""]:
        """Mean next-token cross-entropy over the suffix targets (0 if there are none: a
        prompt-only batch)."""
        sampling.check_deterministic(type(self).__name__)
        hidden, seq = runner.run(HeadTokens())
        targets = seq.is_suffix & seq.role_mask(*self.roles)
        return next_token_loss(hidden, seq.token_ids, targets, runner.lm_logits)

    def extra_repr(self) -> str:
        return f"roles={[r.name for r in self.roles]}"
