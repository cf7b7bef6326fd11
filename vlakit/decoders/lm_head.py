"""The LM head tied to the token embedding, as a module (so FSDP2 gathers it in forward)."""

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["TiedLMHead"]


class TiedLMHead(nn.Module):
    """``hidden [..., d] -> logits [..., V]`` with the embedding's own ``weight`` Parameter.

    The head holds the *same* ``Parameter`` object as the embedding, so the weight is used
    inside this module's ``forward`` (what FSDP2 needs to gather it) and trained once.
    The state dict stores it once, under the embedding: this module saves no key. A
    checkpoint that stores a tied ``lm_head.weight`` too (as transformers' do) loads
    unchanged; one whose ``lm_head.weight`` differs from its embedding raises before the
    decoder loads anything, since a tied head cannot hold it.

    Whatever replaces the embedding's ``Parameter`` (``to_empty``, ``.to``,
    ``load_state_dict(assign=True)``) leaves the head pointing at the old one unless the
    two are tied again: [`TransformerDecoder`][vlakit.decoders.TransformerDecoder] does
    that itself after each of these; a model of your own calls
    [`tie`][vlakit.decoders.TiedLMHead.tie].

    Args:
        embed: the token embedding whose weight ``[V, d]`` the head reuses.
    """

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.weight = embed.weight

    # The weight belongs to the embedding's entry of the state dict: save nothing here and
    # load nothing here (a tied ``lm_head.weight`` in a checkpoint is accepted and dropped).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a stored tied weight was compared with the embedding by the decoder's pre-hook
        state_dict.pop(prefix + "weight", None)

    def tie(self, embed: nn.Embedding) -> None:
        """Point this head at ``embed.weight`` again."""
        self.weight = embed.weight

    def forward(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        return F.linear(hidden, self.weight)

    def extra_repr(self) -> str:
        v, d = self.weight.shape
        return f"tied: {d} -> {v}"
