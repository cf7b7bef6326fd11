"""The head contract: what every head does and what the model gives it.

```
   training: head.loss(runner, sampling)      prediction: head.predict(runner, sampling)
                   │                                         │
   runner.target_actions() (normalised)      ┌───────────────┼──────────────────┐
   runner.run(tokens) -> hidden, seq      generate(m)    run(tokens)   prefix(r).run(tokens)
   or runner.prefix().run_suffix(...)                                  .run_suffix(x, role)
                   │                                         │
              scalar loss                           normalised actions
```

A head

1. **places** its tokens ([HeadTokens][vlakit.heads.HeadTokens]): extra tokens (a diffusion
   timestep) and action slots (embeddings and, for vocabulary tokens, ids);
2. **trains** through one entry, ``loss(runner, sampling)``: it reads the normalised target
   actions from ``runner.target_actions()``, runs its tokens through the runner (one pass
   over the whole sequence, or a prefix encoded once and a suffix against it, pi0-style)
   and returns the scalar loss;
3. **predicts** through the same runner: greedy generation (discrete tokens), one pass with
   its slots (L1 regression), or a prefix in a read-only cache and one of the samplers of
   [vlakit.heads.sampling][vlakit.heads.sampling] over suffix passes (diffusion, flow).

Randomness is an argument: [Sampling][vlakit.heads.Sampling] carries the generator, given
noise or times and the step wrapper; no head draws from torch's global random state at
prediction.

Heads import nothing of the decoders or the model: everything reaches them through the
[ModelRunner][vlakit.heads.ModelRunner].
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlakit.core import TokenRole, TokenSequence
from vlakit.heads.sampling import Sampling

__all__ = [
    "action_loss_mean",
    "HeadTokens",
    "Head",
    "ActionHead",
    "ModelRunner",
    "PrefixRunner",
    "has_action_targets",
]

EmbedFn = Callable[[Tensor], Tensor]
"""``ids [b, t] -> embeddings [b, t, d]`` (the decoder's token embedding)."""
LogitsFn = Callable[[Tensor], Tensor]
"""``hidden [..., d] -> logits [..., V]`` (the decoder's LM head)."""


def action_loss_mean(
    errors: Float[Tensor, "b c a"], is_pad: Bool[Tensor, "b c"] | None
) -> Float[Tensor, ""]:
    """The mean of per-element losses ``errors`` over the real (not padded) target steps:
    ``sum(errors over real steps) / (real steps * a)``; 0 when every step is padding.
    ``is_pad=None``: the plain mean."""
    if is_pad is None:
        return errors.mean()
    real = (~is_pad).to(errors.dtype)[..., None]  # [b, c, 1]
    count = real.sum() * errors.shape[-1]
    return (errors * real).sum() / count.clamp_min(1)


def has_action_targets(inputs: Any) -> bool:
    """Whether a batch carries target actions (``inputs.actions``): what every action head
    answers for [Head.has_targets][vlakit.heads.Head.has_targets]."""
    return getattr(inputs, "actions", None) is not None


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
        """Run the head's slot tokens as the suffix (as the interleaver appends them)
        against the cached prefix.

        Returns final hidden states and the sequence of ``[last prefix token] + suffix``:
        heads find their slots by role, exactly as in a full pass.
        """
        ...

    def run_suffix(
        self,
        embeds: Float[Tensor, "B m d"],
        roles: TokenRole | Int[Tensor, "B m"],
        decoder: Any = None,
        condition: Float[Tensor, "B c"] | None = None,
    ) -> Float[Tensor, "B m d"]:
        """Run ``m`` raw suffix tokens against the cached prefix; their final hidden states.

        Suffix tokens follow each row's last prefix token (positions continue from there);
        which prefix and suffix tokens each one sees is the model's mask policy over
        ``prefix + suffix`` (the policy must keep the prefix blind to the suffix).
        ``decoder``: another layer stack sharing the prefix's keys and values (an action
        expert); ``condition``: its per-call condition (pi0.5's adaptive norms).
        """
        ...


@runtime_checkable
class ModelRunner(Protocol):
    """The model's side of training and prediction for one batch, handed to
    [Head.loss][vlakit.heads.Head.loss] and [ActionHead.predict][vlakit.heads.ActionHead.predict]
    ([VLARunner][vlakit.runner.VLARunner] implements it)."""

    batch_size: int
    device: torch.device
    dtype: torch.dtype
    """The decoder's compute dtype: what new slot embeddings should be."""

    def target_actions(self) -> Float[Tensor, "b c a"]:
        """The batch's target actions, normalised, checked against the head's chunk size
        and action width (a ``ValueError`` names the dimension)."""
        ...

    def target_is_pad(self) -> Bool[Tensor, "b c"] | None:
        """``True`` for target steps that are padding past an episode's end (the batch's
        ``action_is_pad``); ``None`` when every step is real. Every action loss leaves the
        padded steps out ([action_loss_mean][vlakit.heads.action_loss_mean])."""
        ...

    def proprio(self) -> Float[Tensor, "b p"] | None:
        """The batch's robot state, normalised (``None`` without one), for a head that reads
        it itself (a [ProprioHead][vlakit.heads.ProprioHead]: pi0's state token) instead of
        a ``PROPRIO`` token in the prefix."""
        ...

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

    def run_layers(
        self, tokens: HeadTokens, layers: tuple[int, ...]
    ) -> tuple[Float[Tensor, "b n d"], TokenSequence, dict[int, Tensor]]:
        """``run`` that also returns the outputs of decoder ``layers`` (``{i: [b, n, d]}``),
        for heads that read middle-layer features."""
        ...

    def suffix_length(self, num_slots: int) -> int:
        """Suffix tokens a prefix runner runs for ``num_slots`` slots (the interleaver's
        layout: e.g. the slots and ``</s>``)."""
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
        prefix. In training the prefix keeps its graph: gradients reach it through the
        cached keys and values."""
        ...

    def repeat(self, repeats: int) -> "ModelRunner":
        """The same batch with every row repeated ``repeats`` times (adjacent copies)."""
        ...


@runtime_checkable
class Head(Protocol):
    """Every head: one training entry."""

    def has_targets(self, inputs: Any) -> bool:
        """Whether ``inputs`` (a [VLAInputs][vlakit.VLAInputs]) carry this head's training
        targets, so the model computes a loss."""
        ...

    def loss(self, runner: ModelRunner, sampling: Sampling) -> Float[Tensor, ""]:
        """Scalar training loss: the head places its tokens, runs them through ``runner``
        (a whole pass or a prefix and suffix) and compares with ``runner.target_actions()``
        (or the suffix text); ``sampling`` gives the training draws (generator, noise, time)."""
        ...


@runtime_checkable
class ActionHead(Head, Protocol):
    """A head that predicts actions ``[b, chunk_size, action_dim]``."""

    chunk_size: int
    action_dim: int
    num_action_tokens: int
    """Tokens the head places in the sequence for training (for length checks)."""

    def predict(
        self, runner: ModelRunner, sampling: Sampling
    ) -> Float[Tensor, "b c a"] | Float[Tensor, "b n c a"]:
        """Normalised actions ``[b, chunk, a]`` (float32); ``[b, n, chunk, a]`` when
        ``sampling.num_samples = n`` (sampling heads only)."""
        ...


@runtime_checkable
class ProprioHead(Protocol):
    """A head that reads the robot state itself (``runner.proprio()``: pi0's state token
    in its action expert) instead of a ``PROPRIO`` token the runner places in the prefix;
    a model with such a head needs no proprio projector."""

    def proprio_width(self) -> int:
        """The widest state ``[b, p]`` the head takes (``p <=`` this)."""
        ...
