"""Saving and loading any composition: the constructor tree as JSON and the weights as
safetensors.

[save_model][vlakit.persistence.save_model] writes ``vlakit.json`` (what
[describe][vlakit.core.describe] gives: class paths, constructor arguments and every
recorded transform since, no pickle) and ``model.safetensors``;
[load_model][vlakit.persistence.load_model] rebuilds the composition on the ``meta`` device
(replaying the transforms: LoRA applied or merged, a truncated tower, FiLM added, linears
swapped by a factory) and assigns the weights strictly. ``VLA.save_pretrained`` /
``VLA.from_pretrained`` / ``VLA.push_to_hub`` call these.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlakit.core import (
    CheckpointError,
    CheckpointFiles,
    LoadReport,
    building,
    describe,
    load_into,
    rebuild,
)

__all__ = ["save_model", "load_model", "push_model", "DESCRIPTION_FILE", "WEIGHTS_FILE"]

DESCRIPTION_FILE = "vlakit.json"
"""The composition, as JSON: the constructor tree (see [describe][vlakit.core.describe])."""
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "vlakit.composition"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomically(path: Path, name: str, write) -> None:
    with tempfile.NamedTemporaryFile(dir=path, prefix=f".{name}.", delete=False) as tmp:
        temporary = tmp.name
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # as open() would: temporary files are 0600
        os.replace(temporary, path / name)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` to the directory ``path``: ``model.safetensors`` (every parameter and
    persistent buffer) and ``vlakit.json``, a readable description of the composition (the
    constructor tree with nested blocks and the transforms applied since, as
    [describe][vlakit.core.describe] gives it). Files are written under temporary names and
    renamed, so an interrupted save leaves no half-written checkpoint. A block that cannot be
    described (a wrapped timm or transformers model, a block replaced by hand after
    construction) raises a [DescriptionError][vlakit.core.DescriptionError] naming it before
    anything is written. Returns the directory."""
    from safetensors.torch import save_file

    description = {"format": _FORMAT, "model": describe(model)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # shared storage: its own copy
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    _write_atomically(path, WEIGHTS_FILE, lambda f: save_file(state, f))
    _write_atomically(path, DESCRIPTION_FILE,
                      lambda f: Path(f).write_text(json.dumps(description, indent=1)))
    return path


def _local_directory(path: str | os.PathLike, revision: str | None) -> Path:
    text = os.fspath(path)
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists() or path.is_absolute() or text.startswith(".") or text.count("/") > 1:
        raise CheckpointError(
            f"{text} is not a directory: a saved model is a directory holding "
            f"{DESCRIPTION_FILE} and {WEIGHTS_FILE} (a Hub repository id is 'owner/name')"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(path), revision=revision))


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    trust: tuple[str, ...] = (),
) -> tuple[nn.Module, LoadReport]:
    """Rebuild a composition saved with [save_model][vlakit.persistence.save_model] and load
    its weights strictly (missing, unexpected and mis-shaped keys are reported together).

    Args:
        path: a local directory, or a Hugging Face Hub repository id (downloaded with
            ``huggingface_hub.snapshot_download``).
        dtype: parameter dtype (default: as stored).
        device: where the weights go (default CPU).
        revision: the Hub revision, for a repository id.
        trust: module prefixes of your own ``@recorded`` blocks. ``vlakit.json`` is data:
            only vlakit's blocks (and those under ``trust``) are ever imported or called by
            it (see [rebuild][vlakit.core.rebuild]).

    Returns:
        the model (rebuilt on ``meta``, weights assigned, in eval mode as transformers
        returns it) and the [LoadReport][vlakit.core.LoadReport].
    """
    path = _local_directory(path, revision)
    file = path / DESCRIPTION_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {DESCRIPTION_FILE}: not saved by "
                              f"VLA.save_pretrained (published checkpoints load with "
                              f"vlakit.models.load_*)")
    data = json.loads(file.read_text())
    if data.get("format") != _FORMAT:
        raise CheckpointError(f"{file} is not a vlakit composition (format "
                              f"{data.get('format')!r})")
    with building(None, "meta"):
        model = rebuild(data["model"], trust=tuple(trust))
    with CheckpointFiles(path / WEIGHTS_FILE) as files:
        report = load_into(model, files, device=device,
                           dtype="stored" if dtype is None else dtype,
                           source=str(path / WEIGHTS_FILE))
    return model.eval(), report


def push_model(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload a vlakit model",
) -> Any:
    """[save_model][vlakit.persistence.save_model] to a temporary folder and upload it to the
    Hugging Face Hub repository ``repo_id`` (created if needed) with
    ``huggingface_hub.HfApi``; returns its commit info. ``VLA.from_pretrained(repo_id)``
    pulls it back."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder,
                                 commit_message=commit_message)
