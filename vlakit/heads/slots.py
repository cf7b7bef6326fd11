"""Finding a head's action slots in a sequence and reading their hidden states."""

import torch
from jaxtyping import Float
from torch import Tensor

from vlakit.core import TokenRole, TokenSequence
from vlakit.core.checks import should_validate

__all__ = ["SLOT_READS", "read_slots"]

SLOT_READS = ("previous", "slot", "next")
"""Which hidden state feeds each slot: ``"previous"``, the state one position before the
slot (OpenVLA-OFT: slot ``j`` is read at ``j - 1``, the first slot from the prompt's last
token), ``"slot"``, the slot's own state (pi0), or ``"next"``, the state one position after
it (LightVLA's released ``predict_action``: the last ``chunk * a`` positions of the
sequence, i.e. slots ``2..m`` and ``</s>``; two positions from its training read)."""


def read_slots(
    hidden: Float[Tensor, "b n d"],
    seq: TokenSequence,
    num_slots: int,
    read: str = "previous",
    head: str = "the head",
) -> Float[Tensor, "b m d"]:
    """The hidden states that feed each of the ``num_slots`` action slots, ``[b, m, d]``.

    Slots are the ``ACTION`` tokens of ``seq``, contiguous in each row (they may start at a
    different index per row in a right-padded batch). Index arithmetic only, no host read;
    with validation on (see [validation][vlakit.core.validation]) a row whose slot count
    is not ``num_slots`` raises a ``ValueError`` naming both numbers.

    Args:
        hidden: final hidden states of ``seq``.
        seq: the sequence the decoder ran on.
        num_slots: slots per row the head expects (``chunk_size * action_dim`` or
            ``chunk_size``).
        read: ``"previous"`` or ``"slot"`` (see ``SLOT_READS``).
        head: the head's name, for error messages.
    """
    if read not in SLOT_READS:
        raise ValueError(f"read must be one of {SLOT_READS}, got {read!r}")
    is_slot = seq.roles == int(TokenRole.ACTION)  # [b, n]
    if should_validate(is_slot):
        counts = is_slot.sum(1)
        if bool((counts != num_slots).any()):
            found = sorted(set(counts.tolist()))
            raise ValueError(
                f"the sequence has {found[0] if len(found) == 1 else found} action slots per "
                f"row but {head} reads {num_slots} (its chunk_size x action_dim, or chunk_size "
                f"for one token per step): build the head with the chunk size and action "
                f"dimension of the slots placed"
            )
    first = is_slot.to(torch.int8).argmax(dim=1)  # [b] first slot of each row
    index = first[:, None] + torch.arange(num_slots, device=first.device)  # [b, m]
    if read == "next" and should_validate(first) and bool((first + num_slots >= seq.length).any()):
        raise ValueError(
            f"read='next' reads the token after each slot, but in this sequence the last slot "
            f"is the last token (nothing follows it, e.g. no </s>); {head} needs a token "
            f"after the slots (an interleaver with eos_id) or another read"
        )
    if read == "previous":
        index = index - 1
    elif read == "next":
        index = index + 1
    d = hidden.shape[-1]
    return torch.gather(hidden, 1, index[..., None].expand(-1, -1, d))


def check_reads(read: str, predict_read: str | None) -> tuple[str, str]:
    """Check a head's ``read`` and ``predict_read``; returns both (``predict_read``
    defaulting to ``read``)."""
    for name, value in (("read", read), ("predict_read", predict_read)):
        if value is not None and value not in SLOT_READS:
            raise ValueError(f"{name} must be one of {SLOT_READS}, got {value!r}")
    return read, read if predict_read is None else predict_read
