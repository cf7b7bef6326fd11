"""The LM head tied to the token embedding, as a module (so FSDP2 gathers it in forward)."""

import torch
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
    unchanged; one whose ``lm_head.weight`` differs from its embedding raises, since a
    tied head cannot hold it.

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
        # kept aside until the owner re-ties and compares it with the loaded embedding
        self._loaded_weight = state_dict.pop(prefix + "weight", None)

    def check_loaded(self) -> None:
        """Raise if the last load brought an ``lm_head.weight`` unequal to the embedding."""
        loaded, self._loaded_weight = getattr(self, "_loaded_weight", None), None
        if loaded is None or loaded.is_meta or self.weight.is_meta:
            return
        if loaded.shape != self.weight.shape or not torch.equal(
            loaded.to(self.weight.device, self.weight.dtype), self.weight.detach()
        ):
            raise ValueError(
                "the checkpoint's lm_head.weight differs from its embedding weight, but this "
                "decoder ties the two (built with lm_head=None / tie_embeddings=True); build "
                "an untied decoder to load it"
            )

    def tie(self, embed: nn.Embedding) -> None:
        """Point this head at ``embed.weight`` again."""
        self.weight = embed.weight

    def forward(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        return F.linear(hidden, self.weight)

    def extra_repr(self) -> str:
        v, d = self.weight.shape
        return f"tied: {d} -> {v}"
