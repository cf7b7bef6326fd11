"""Token roles: every token in a vlakit sequence knows what it is."""

import enum

__all__ = ["TokenRole"]


class TokenRole(enum.IntEnum):
    """The role of one token in an interleaved sequence.

    Stored per token as an ``int64`` tensor ``roles [b, n]`` next to the embeddings, so
    pruners, mask policies and heads find their tokens by role instead of by counts
    configured elsewhere.
    """

    PAD = 0
    BOS = 1
    IMAGE = 2
    PROPRIO = 3
    TIMESTEP = 4
    TEXT = 5
    ACTION = 6
    EOS = 7
