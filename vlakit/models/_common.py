"""What every family's loader shares: reading a checkpoint directory's ``config.json``."""

import json
import os
from pathlib import Path
from typing import Any

from vlakit.bundle import ObservationKeys, PolicyBundle
from vlakit.core import CheckpointError

__all__ = ["read_config", "policy_bundle"]


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


def policy_bundle(
    model: Any,
    path: str | os.PathLike,
    processor_cls: type,
    keys: ObservationKeys | None,
    tokenizer: Any,
    **processor_options: Any,
) -> PolicyBundle:
    """A loaded model as a [PolicyBundle][vlakit.bundle.PolicyBundle]: the tokenizer the
    checkpoint directory holds (``AutoTokenizer``; a clear error if it holds none), the
    family's processor built for the model with the options its reference uses, and the
    observation keys (default [ObservationKeys.for_model][vlakit.bundle.ObservationKeys.for_model]).
    The model is put in eval mode."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        directory = Path(path)
        if not any((directory / name).is_file() for name in
                   ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise CheckpointError(
                f"{directory} holds no tokenizer (tokenizer.json, tokenizer.model or "
                f"tokenizer_config.json): pass tokenizer= (the one the model was trained with; "
                f"another tokenizer of the same size gives wrong actions)"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    processor = processor_cls.from_model(tokenizer, model, **processor_options)
    keys = ObservationKeys.for_model(model) if keys is None else keys
    return PolicyBundle(model.eval(), processor, keys)
