"""The head contract: what every head does and what the model gives it.

```
              training                                  prediction
  actions ─ head.place(actions, embed, like) ┐ head.predict(runner) ─┬─ runner.generate(m)
            HeadTokens(extras, slots)   │                             ├─ runner.run(tokens)
  VLA: interleave ─ decoder ─ hidden ───┤                             ├─ runner.prefix(r)
  head.loss(hidden, seq, tokens, lm) ◄──┘                             │   .run_suffix(x, role)
                                                                      └─► normalised actions
```

A head

1. **places** its tokens: [`Head.place`][vlakit.heads.Head.place] returns
   [HeadTokens][vlakit.heads.HeadTokens]:
   extra tokens (a diffusion timestep) and action slots (embeddings and, for vocabulary
   tokens, ids), plus whatever its loss needs later (noise, targets);
2. computes its **loss** from the final hidden states and the
   [TokenSequence][vlakit.core.TokenSequence] (it finds its slots by role);
3. **predicts** through a [PredictionRunner][vlakit.heads.PredictionRunner] the model hands
   it: greedy generation (discrete tokens), one pass with its slots (L1 regression), or a
   prefix encoded once into a read-only cache and a fixed-step loop of suffix passes against
   it (diffusion, flow matching; ``prefix(repeats)`` shares one prefix among several samples).

Heads import nothing of the decoders or the model: the embedding and the LM head reach them
as callables, the rest through the runner.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlakit.core import TokenRole, TokenSequence

__all__ = [
    "HeadTokens",
    "Head",
    "ActionHead",
    "PrefixTrainedHead",
    "PredictionRunner",
    "PrefixRunner",
]

EmbedFn = Callable[[Tensor], Tensor]
"""``ids [b, t] -> embeddings [b, t, d]`` (the decoder's token embedding)."""
LogitsFn = Callable[[Tensor], Tensor]
"""``hidden [..., d] -> logits [..., V]`` (the decoder's LM head)."""


@dataclasses.dataclass(repr=False)
class HeadTokens:
    """What a head places in the sequence, and what its loss needs back.

    Args:
        extras: ``(tokens [b, k, d], role)`` pairs the interleaver places after the image
            tokens (e.g. a diffusion timestep token), in order.
        action_embeds: ``[b, m, d]`` action-slot embeddings, or ``None`` (no slots).
        action_ids: ``[b, m]`` vocabulary ids of the slots (discrete tokens), or ``None``.
        state: anything the head's loss needs (sampled noise, targets), by name.
        action_roles: ``[b, m]`` roles of the slot tokens, default all ``ACTION``; a head
            that leads its slots with another token (a diffusion timestep in the
            cache-friendly layout) marks it here (``TIMESTEP``).

    Everything in ``action_embeds`` is suffix: the interleaver places it after the prompt
    (and ``</s>`` after it), and a prefix cache never holds it. A dataclass, so FSDP2 finds
    the tensors a sharded head's ``place`` returns and re-gathers the head's weights when
    their gradients arrive.
    """

    extras: list[tuple[Tensor, TokenRole]] = dataclasses.field(default_factory=list)
    action_embeds: Float[Tensor, "b m d"] | None = None
    action_ids: Int[Tensor, "b m"] | None = None
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    action_roles: Int[Tensor, "b m"] | None = None

    def __post_init__(self) -> None:
        self.extras = list(self.extras)
        self.state = {} if self.state is None else self.state

    def __repr__(self) -> str:
        slots = None if self.action_embeds is None else tuple(self.action_embeds.shape)
        return f"HeadTokens(extras={len(self.extras)}, action_slots={slots})"


@runtime_checkable
class PrefixRunner(Protocol):
    """A prefix (images, extras, prompt) encoded once into a read-only KV cache."""

    batch_size: int
    """Rows of the suffix batch: the model's batch times ``repeats``."""

    def run(self, tokens: HeadTokens) -> tuple[Float[Tensor, "B s d"], TokenSequence]:
        """Run the head's slot tokens as the suffix (as the interleaver appends them, e.g.
        slots then ``</s>``) against the cached prefix.

        Returns final hidden states and the sequence of ``[last prefix token] + suffix``:
        heads find their slots by role, exactly as in a full pass.
        """
        ...

    def run_suffix(
        self, embeds: Float[Tensor, "B m d"], roles: TokenRole | Int[Tensor, "B m"]
    ) -> Float[Tensor, "B m d"]:
        """Run ``m`` raw suffix tokens against the cached prefix; their final hidden states.

        Suffix tokens follow each row's last prefix token (positions continue from there);
        which prefix and suffix tokens each one sees is the model's mask policy over
        ``prefix + suffix`` (the policy must keep the prefix blind to the suffix).
        """
        ...


@runtime_checkable
class PredictionRunner(Protocol):
    """The model's side of prediction, handed to
    [`ActionHead.predict`][vlakit.heads.ActionHead.predict]."""

    batch_size: int
    device: torch.device
    dtype: torch.dtype
    """The decoder's compute dtype: what new slot embeddings should be."""

    def embed_tokens(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t d"]:
        """The decoder's token embedding."""
        ...

    def lm_logits(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        """The decoder's LM head."""
        ...

    def generate(self, max_new_tokens: int) -> Int[Tensor, "b m"]:
        """Greedy generation of exactly ``max_new_tokens`` tokens after the prompt."""
        ...

    def run(self, tokens: HeadTokens) -> tuple[Float[Tensor, "b n d"], TokenSequence]:
        """One pass over the whole sequence with the head's tokens placed: final hidden
        states and the sequence (to find the slots by role)."""
        ...

    supports_prefix_cache: bool
    """Whether ``prefix`` works (the decoder keeps a read-only prefix cache)."""

    def prefix(
        self,
        repeats: int = 1,
        tokens: HeadTokens | None = None,
        suffix_len: int | None = None,
    ) -> PrefixRunner:
        """Encode the prefix once; ``repeats`` > 1 repeats every row (several samples per
        observation share one prefix); ``tokens.extras`` (if given) go into the prefix;
        ``suffix_len`` reserves cache slots for the suffix so steps copy nothing of the
        prefix."""
        ...

    def repeat(self, repeats: int) -> "PredictionRunner":
        """The same batch with every row repeated ``repeats`` times (adjacent copies)."""
        ...


@runtime_checkable
class Head(Protocol):
    """Every head: places its tokens and computes its loss."""

    def has_targets(self, inputs: Any) -> bool:
        """Whether ``inputs`` (a [VLAInputs][vlakit.VLAInputs]) carry this head's training
        targets, so the model computes a loss."""
        ...

    def place(
        self,
        actions: Float[Tensor, "b c a"] | None,
        embed_tokens: EmbedFn,
        like: Float[Tensor, "b p d"],
    ) -> HeadTokens:
        """Tokens to place: for training (``actions`` normalised) or prediction (``None``).

        ``like`` is the batch's projected image tokens: its batch size, device and dtype
        are the ones new tokens (zero slots, noise, a timestep token) must have.
        """
        ...

    def loss(
        self,
        hidden: Float[Tensor, "b n d"],
        seq: TokenSequence,
        tokens: HeadTokens,
        lm_logits: LogitsFn,
    ) -> Float[Tensor, ""]:
        """Scalar training loss from the final hidden states."""
        ...


@runtime_checkable
class PrefixTrainedHead(Protocol):
    """A head that trains its suffix against the prefix cache (pi0's action expert).

    [VLA.forward][vlakit.VLA.forward] calls ``prefix_loss`` instead of running the whole
    sequence through the decoder: the head encodes the prefix with ``runner.prefix()`` and
    runs its suffix (e.g. through its own expert decoder, ``run_suffix(..., decoder=)``);
    gradients flow through the cached keys and values into the prefix. When the prefix
    cannot see the suffix (a block mask), this equals one joint pass.
    """

    def has_targets(self, inputs: Any) -> bool:
        ...

    def prefix_loss(
        self, runner: PredictionRunner, actions: Float[Tensor, "b c a"]
    ) -> Float[Tensor, ""]:
        """Scalar loss for normalised target ``actions``."""
        ...


@runtime_checkable
class ActionHead(Head, Protocol):
    """A head that predicts actions."""

    num_action_tokens: int
    """Tokens the head places in the sequence for training (for length checks)."""

    def predict(self, runner: PredictionRunner) -> Float[Tensor, "b c a"]:
        """Normalised actions ``[b, chunk, a]`` (float32).

        A sampling head (``supports_sampling = True``: diffusion, flow matching) also takes
        ``num_samples`` and then returns ``[b, num_samples, chunk, a]``.
        """
        ...
