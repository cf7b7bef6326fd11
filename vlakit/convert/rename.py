"""The one key-renaming mechanism every weight converter uses: ordered regex rules."""

import re
from collections.abc import Mapping, Sequence
from typing import Any

from vlakit.core.checkpoint import CheckpointError

__all__ = ["Rules", "rename_keys"]

Rules = Sequence[tuple[str, str | None]]
"""``(pattern, replacement)`` pairs; ``replacement`` uses ``\\1``-style groups, ``None`` drops
the key."""


def rename_keys(
    state_dict: Mapping[str, Any], rules: Rules, source: str, strict: bool = True
) -> dict[str, Any]:
    """Rename every key by the first rule whose regex fully matches it.

    Args:
        state_dict: source weights (any values: a loader renames ``{key: key}`` to plan a
            lazy load).
        rules: ``(pattern, replacement)`` pairs; ``replacement`` uses ``\\1``-style groups,
            ``None`` drops the key.
        source: name of the format, for error messages.
        strict: raise on a key no rule matches (else keep it unchanged).

    Raises:
        CheckpointError: naming the first key no rule matches (``strict``), or two source
            keys that rename to the same key.
    """
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            match = re.fullmatch(pattern, key)
            if match:
                new = None if replacement is None else match.expand(replacement)
                break
        else:
            if strict:
                raise CheckpointError(
                    f"{source} checkpoint key {key!r} matches no rename rule, so the converter "
                    f"does not know where it goes in vlakit's module (an unsupported option?)"
                )
            new = key
        if new is None:
            continue
        if new in out:
            raise CheckpointError(
                f"{source} checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}"
            )
        out[new], origin[new] = value, key
    return out
