"""What every family's loader shares: reading a checkpoint directory's ``config.json``."""

import json
import os
from pathlib import Path

from vlakit.core import CheckpointError

__all__ = ["read_config"]


def read_config(path: str | os.PathLike, model_type: str | None = None,
                family: str | None = None) -> dict:
    """A checkpoint directory's ``config.json`` as a dict (a clear error if absent or bad).

    Args:
        path: the directory.
        model_type: when given, the config's ``model_type`` must be it (else a
            [CheckpointError][vlakit.core.CheckpointError] naming both).
        family: the architecture's name for that message (default ``model_type``).
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{Path(path)} has no config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None
    if model_type is not None and raw.get("model_type") != model_type:
        raise CheckpointError(
            f"{file} describes a {raw.get('model_type')!r} model, not {family or model_type} "
            f"(model_type {model_type!r})"
        )
    return raw
