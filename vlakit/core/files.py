"""Reading checkpoint files and loading them into a model without doubling memory.

(In ``vlakit.core``, and re-exported by ``vlakit.convert``.)

- safetensors, one file or an index with shards (``model.safetensors.index.json``), read
  through memory maps: [CheckpointFiles][vlakit.core.CheckpointFiles] lists keys, shapes
  and dtypes from the headers alone and reads a tensor only when asked;
- torch pickles (``.pt``, OpenVLA-OFT's head and projector files) only through
  ``torch.load(weights_only=True)``: [read_torch_weights][vlakit.core.read_torch_weights].
  Nothing in vlakit unpickles arbitrary objects;
- [load_into][vlakit.core.load_into] checks every key and shape first (a report names the
  missing, unexpected and mis-shaped keys) and only then assigns the tensors, one at a
  time, into a model built on the ``meta`` device: a checkpoint of S bytes peaks at about S.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from vlakit.core.checkpoint import CheckpointError

__all__ = [
    "CheckpointFiles",
    "CheckpointView",
    "LoadReport",
    "load_into",
    "read_torch_weights",
    "strip_prefix",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointFiles(Mapping):
    """The tensors of a safetensors checkpoint, read lazily (a ``Mapping[str, Tensor]``).

    Args:
        path: a directory holding ``model.safetensors.index.json`` (sharded) or
            ``model.safetensors``, or the path of one ``.safetensors`` file.

    Every file's header is read when the object is made, so a missing shard, a truncated or
    corrupt file and a key listed in the index but absent from its shard raise a
    [CheckpointError][vlakit.core.CheckpointError] naming the file (and key) before any
    tensor is read. ``shape(key)`` and ``dtype(key)`` come from the headers; ``files[key]``
    reads one tensor through a memory map. Use as a context manager (or call ``close``) to
    release the maps.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        path = Path(path)
        self.path = path
        self._where: dict[str, Path] = {}
        if path.is_dir():
            index, single = path / INDEX_NAME, path / SINGLE_NAME
            if index.exists():
                self._read_index(index)
            elif single.exists():
                self._where = dict.fromkeys(self._keys_of(single, safe_open), single)
            else:
                found = sorted(p.name for p in path.iterdir())[:10]
                raise CheckpointError(
                    f"{path} holds neither {INDEX_NAME} nor {SINGLE_NAME} (found: {found})"
                )
        elif path.is_file():
            self._where = dict.fromkeys(self._keys_of(path, safe_open), path)
        else:
            raise CheckpointError(f"checkpoint path {path} does not exist")
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, dict] = {}

    def _read_index(self, index: Path) -> None:
        from safetensors import safe_open

        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index} is not a safetensors index (a JSON object with a 'weight_map'): "
                f"{error}"
            ) from None
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        for shard, keys in shards.items():
            file = index.parent / shard
            if not file.exists():
                raise CheckpointError(
                    f"{index} maps {len(keys)} keys (e.g. {keys[0]!r}) to shard {shard}, which "
                    f"is not in {index.parent}"
                )
            present = set(self._keys_of(file, safe_open))
            absent = [k for k in keys if k not in present]
            if absent:
                raise CheckpointError(
                    f"{index} places key {absent[0]!r} in {shard}, but that file does not hold "
                    f"it ({len(absent)} such keys)"
                )
            for key in keys:
                self._where[key] = file

    @staticmethod
    def _keys_of(file: Path, safe_open) -> list[str]:
        try:
            with safe_open(str(file), framework="pt") as handle:
                return list(handle.keys())
        except Exception as error:  # safetensors raises its own error type for bad files
            raise CheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {error}"
            ) from None

    # -- Mapping ---------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Tensor:
        file = self._where[key]
        return self._handle(file).get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    # -- headers ---------------------------------------------------------------------------

    def _handle(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _header(self, file: Path) -> dict:
        if file not in self._headers:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[file] = json.loads(f.read(size))
        return self._headers[file]

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of ``key`` (from the header; nothing is read)."""
        return tuple(self._header(self._where[key])[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key`` (from the header)."""
        name = self._header(self._where[key])[key]["dtype"]
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"key {key!r} in {self._where[key]} has unknown dtype {name}")
        return _SAFETENSORS_DTYPES[name]

    def file_of(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self._where[key]

    def nbytes(self) -> int:
        """Total size of the tensors."""
        total = 0
        for key in self._where:
            entry = self._header(self._where[key])[key]
            start, end = entry["data_offsets"]
            total += end - start
        return total

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        files = sorted({p.name for p in self._where.values()})
        return f"CheckpointFiles({str(self.path)!r}, {len(self)} tensors in {files})"


class CheckpointView(Mapping):
    """A lazily read checkpoint derived from another (``base``): keys, ``shape(key)``,
    ``dtype(key)`` and closing are the base's, so a subclass overrides only what it changes
    (``__getitem__`` to merge an adapter, the key set to overlay another file).
    [load_into][vlakit.core.load_into] reads shapes and dtypes through it without reading
    tensors."""

    def __init__(self, base: Mapping) -> None:
        self.base = base

    def __getitem__(self, key: str) -> Tensor:
        return self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, key: object) -> bool:
        return key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of ``key``, from the base's headers where it has them."""
        shape = getattr(self.base, "shape", None)
        return tuple(self.base[key].shape) if shape is None else shape(key)

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key``."""
        dtype = getattr(self.base, "dtype", None)
        return self.base[key].dtype if dtype is None else dtype(key)

    def close(self) -> None:
        close = getattr(self.base, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "CheckpointView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_torch_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A ``.pt`` / ``.bin`` state dict, read with ``torch.load(weights_only=True)`` (tensors
    and plain containers only: an arbitrary pickle is refused, never run) and memory-mapped
    where torch can."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "weights_only" in str(error) or "Unsupported" in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # an old format
    except Exception as error:
        raise CheckpointError(
            f"{path} could not be read as tensors with torch.load(weights_only=True) (vlakit "
            f"never unpickles arbitrary objects; a truncated or corrupt file fails here too): "
            f"{error}"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat mapping of names to tensors")
    return dict(state)


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys with ``prefix`` removed where they have it (OpenVLA-OFT's files are saved from
    DDP-wrapped modules: ``module.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


@dataclasses.dataclass
class LoadReport:
    """What [load_into][vlakit.core.load_into] did.

    Attributes:
        loaded: number of tensors loaded.
        skipped: checkpoint keys that were accepted and not loaded (parts the model does not
            use, named by the loader).
        cast: ``{stored dtype -> model dtype: count}`` for tensors converted on load (a bf16
            checkpoint into an fp32 model, say).
        nbytes: bytes of the loaded tensors as stored.
    """

    loaded: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    cast: dict[str, int] = dataclasses.field(default_factory=dict)
    nbytes: int = 0

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors ({self.nbytes / 2**20:.1f} MiB)"]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} unused keys (e.g. {self.skipped[0]!r})")
        for conversion, count in self.cast.items():
            parts.append(f"cast {count} tensors {conversion}")
        return "; ".join(parts)


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_into(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    shape_of: Callable[[str], tuple[int, ...]] | None = None,
    dtype_of: Callable[[str], torch.dtype] | None = None,
    skipped: list[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    source: str = "checkpoint",
) -> LoadReport:
    """Load ``state`` (vlakit key names) into ``model`` strictly, checking everything first.

    The keys and shapes of ``state`` are compared with ``model.state_dict()`` before any
    tensor is read; any missing, unexpected or mis-shaped key raises one
    [CheckpointError][vlakit.core.CheckpointError] listing all three kinds, and the model
    is left as it was. Then each tensor is read (from a memory map, for
    [CheckpointFiles][vlakit.core.CheckpointFiles]), cast to the model's dtype (or
    ``dtype``) and moved to ``device`` (default: the model's device, CPU for a ``meta``
    model), and assigned in place of the parameter: a model built on ``meta`` is
    materialised by the load, with no second copy. Floating tensors convert to any
    floating dtype (reported in ``LoadReport.cast``); integer-quantised weights into a
    floating parameter are refused.

    Args:
        model: the model (typically built on ``meta``).
        state: vlakit key -> tensor (lazily read mappings are read one tensor at a time).
        shape_of: the stored shape of a key without reading it (default: ``state.shape``
            when the mapping has it, as [CheckpointFiles][vlakit.core.CheckpointFiles] and
            [CheckpointView][vlakit.core.CheckpointView] do, else ``state[key].shape``).
        dtype_of: likewise the stored dtype.
        skipped: checkpoint keys the caller accepted and dropped, for the report.
        device: where the loaded tensors go.
        dtype: floating dtype for floating parameters (default: each parameter's own);
            ``"stored"`` keeps each tensor's stored dtype. Buffers always take the
            model's dtype (an action normaliser's statistics stay float32 in a bf16 model).
        source: the checkpoint's name, for error messages.
    """
    own = model.state_dict(keep_vars=True)
    shape_of = shape_of or getattr(state, "shape", None) or (lambda key: tuple(state[key].shape))
    dtype_of = dtype_of or getattr(state, "dtype", None) or (lambda key: state[key].dtype)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        f"{k} {shape_of(k)} vs {tuple(own[k].shape)}"
        for k in own if k in state and shape_of(k) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing {len(missing)}: {_describe(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)}: {_describe(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped {len(misshaped)} (stored vs model): "
                         f"{_describe(misshaped)}")
        raise CheckpointError("\n".join(lines))
    for key, target in own.items():
        stored = dtype_of(key)
        if not target.is_floating_point() and stored.is_floating_point:
            raise CheckpointError(
                f"{source} key {key!r} is stored as {stored}, but the model's tensor is "
                f"{target.dtype}"
            )
        if target.is_floating_point() and not stored.is_floating_point:
            raise CheckpointError(
                f"{source} key {key!r} is stored as {stored}, but the model's parameter is "
                f"{target.dtype}: quantised (integer) checkpoints are not supported"
            )
    report = LoadReport(skipped=list(skipped or []))
    parameters = {name for name, _ in model.named_parameters()}
    loaded: dict[str, Tensor] = {}
    for key, target in own.items():
        where = device
        if where is None:
            where = "cpu" if target.is_meta else target.device
        tensor = state[key]
        if dtype == "stored":
            want = tensor.dtype
        elif key in parameters and target.is_floating_point():
            want = dtype or target.dtype
        else:  # buffers keep the model's dtype: normaliser statistics stay float32
            want = target.dtype
        if tensor.dtype != want:
            conversion = f"{str(tensor.dtype).removeprefix('torch.')} -> "
            conversion += str(want).removeprefix("torch.")
            report.cast[conversion] = report.cast.get(conversion, 0) + 1
        report.nbytes += tensor.numel() * tensor.element_size()
        loaded[key] = tensor.to(device=where, dtype=want)
        report.loaded += 1
    model.load_state_dict(loaded, strict=True, assign=True)
    return report
