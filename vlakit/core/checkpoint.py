"""Checkpoints in, strictly: files read lazily, loaded all or nothing.

(In ``vlakit.core``; the readers are re-exported by ``vlakit.convert``.)

- [CheckpointFiles][vlakit.core.CheckpointFiles]: safetensors, one file or an index with
  shards (``model.safetensors.index.json``), through memory maps; keys, shapes and dtypes
  come from the headers alone and a tensor is read only when asked;
- [CheckpointView][vlakit.core.CheckpointView]: the one lazy view derived from another
  checkpoint (renamed keys, tensors held beside it, an adapter merged as it is read), with
  the same ``shape`` / ``dtype`` / ``close``;
- [read_torch_weights][vlakit.core.read_torch_weights]: torch pickles (``.pt``,
  OpenVLA-OFT's head and projector files) only through ``torch.load(weights_only=True)``.
  Nothing in vlakit unpickles arbitrary objects;
- [load_into][vlakit.core.load_into]: the strict loader. Every key and shape is checked
  first and one [CheckpointError][vlakit.core.CheckpointError] names the missing,
  unexpected and mis-shaped keys together, before anything is loaded; then the tensors are
  assigned one at a time into a model built on the ``meta`` device: a checkpoint of S bytes
  peaks at about S. [load_checked][vlakit.core.load_checked] is the same check for one
  block's ``load_state_dict``; [guard_meta_loading][vlakit.core.guard_meta_loading] makes
  torch's own ``load_state_dict`` fill meta-built blocks.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "CheckpointFiles",
    "CheckpointView",
    "LoadReport",
    "load_into",
    "load_checked",
    "guard_meta_loading",
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


class CheckpointError(KeyError, ValueError):
    """A checkpoint key is unknown, missing, or has the wrong shape; or a checkpoint file
    is absent, truncated or of another kind.

    Both a ``KeyError`` (a key problem) and a ``ValueError`` (a bad checkpoint), so callers
    catching either see it.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


# -- lazy checkpoints ------------------------------------------------------------------------

def _stored_shape(state: Mapping, key: str) -> tuple[int, ...]:
    shape = getattr(state, "shape", None)
    return tuple(state[key].shape) if shape is None else tuple(shape(key))


def _stored_dtype(state: Mapping, key: str) -> torch.dtype:
    dtype = getattr(state, "dtype", None)
    return state[key].dtype if dtype is None else dtype(key)


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
        path = Path(path)
        self.path = path
        self._where: dict[str, Path] = {}
        if path.is_dir():
            index, single = path / INDEX_NAME, path / SINGLE_NAME
            if index.exists():
                self._read_index(index)
            elif single.exists():
                self._where = dict.fromkeys(self._keys_of(single), single)
            else:
                found = sorted(p.name for p in path.iterdir())[:10]
                raise CheckpointError(
                    f"{path} holds neither {INDEX_NAME} nor {SINGLE_NAME} (found: {found})"
                )
        elif path.is_file():
            self._where = dict.fromkeys(self._keys_of(path), path)
        else:
            raise CheckpointError(f"checkpoint path {path} does not exist")
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, dict] = {}

    def _read_index(self, index: Path) -> None:
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
            present = set(self._keys_of(file))
            absent = [k for k in keys if k not in present]
            if absent:
                raise CheckpointError(
                    f"{index} places key {absent[0]!r} in {shard}, but that file does not hold "
                    f"it ({len(absent)} such keys)"
                )
            for key in keys:
                self._where[key] = file

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        from safetensors import safe_open

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
    """A lazily read checkpoint derived from another: ``base`` seen through ``names`` (this
    view's key -> the base's key; default: the base's keys unchanged), plus ``tensors`` held
    here (they come first and win over a base key of the same name).

    ``shape(key)`` and ``dtype(key)`` come from the held tensor or the base's headers
    (nothing is read for a [CheckpointFiles][vlakit.core.CheckpointFiles] base); ``close``
    closes the base. A loader plans a load as one view (vlakit key -> stored tensor, each
    read when [load_into][vlakit.core.load_into] assigns it); a subclass changes what a
    base key reads as (``_read``: [MergedCheckpoint][vlakit.convert.MergedCheckpoint]
    merges an adapter into it).

    Args:
        base: the checkpoint read from (any ``Mapping[str, Tensor]``; ``None``: nothing).
        names: this view's keys and the base key each reads; ``None``: every base key.
        tensors: keys whose tensors are given (computed, e.g. fused or overlaid).
    """

    def __init__(
        self,
        base: Mapping | None = None,
        names: Mapping[str, str] | None = None,
        tensors: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.base = {} if base is None else base
        self.names = None if names is None else dict(names)
        self.tensors = dict(tensors or {})

    def source(self, key: str) -> str:
        """The base key that ``key`` reads (``KeyError`` for a held or unknown key)."""
        if self.names is not None:
            return self.names[key]
        if key in self.base:
            return key
        raise KeyError(key)

    def _read(self, source: str) -> Tensor:
        return self.base[source]

    def __getitem__(self, key: str) -> Tensor:
        if key in self.tensors:
            return self.tensors[key]
        return self._read(self.source(key))

    def _base_keys(self) -> Iterable[str]:
        return self.base if self.names is None else self.names

    def __iter__(self) -> Iterator[str]:
        yield from self.tensors
        yield from (k for k in self._base_keys() if k not in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors) + sum(1 for k in self._base_keys() if k not in self.tensors)

    def __contains__(self, key: object) -> bool:  # without reading (or merging) the tensor
        return key in self.tensors or key in self._base_keys()

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of ``key``, from the base's headers where it has them."""
        if key in self.tensors:
            return tuple(self.tensors[key].shape)
        return _stored_shape(self.base, self.source(key))

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key``."""
        if key in self.tensors:
            return self.tensors[key].dtype
        return _stored_dtype(self.base, self.source(key))

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


# -- the strict check ------------------------------------------------------------------------

@dataclasses.dataclass
class _Mismatch:
    """How a checkpoint's keys differ from a model's: every kind, found in one pass."""

    missing: list[str]
    unexpected: list[str]
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, stored, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)


def _compare(own: Mapping[str, Tensor], state: Mapping, shape_of: Callable) -> _Mismatch:
    misshaped = []
    for key, target in own.items():
        if key in state:
            stored = tuple(shape_of(key))
            if stored != tuple(target.shape):
                misshaped.append((key, stored, tuple(target.shape)))
    return _Mismatch(missing=[k for k in own if k not in state],
                     unexpected=[k for k in state if k not in own], misshaped=misshaped)


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _report_mismatch(mismatch: _Mismatch, source: str, model: nn.Module) -> str:
    lines = [f"{source} does not fit {type(model).__name__}:"]
    if mismatch.missing:
        lines.append(f"  missing {len(mismatch.missing)}: {_describe(mismatch.missing)}")
    if mismatch.unexpected:
        lines.append(f"  unexpected {len(mismatch.unexpected)}: "
                     f"{_describe(mismatch.unexpected)}")
    if mismatch.misshaped:
        shapes = [f"{k} {stored} vs {expected}" for k, stored, expected in mismatch.misshaped]
        lines.append(f"  mis-shaped {len(shapes)} (stored vs model): {_describe(shapes)}")
    return "\n".join(lines)


def _check_dtypes(own: Mapping[str, Tensor], dtype_of: Callable, source: str) -> None:
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


# -- loading ---------------------------------------------------------------------------------

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
    mismatch = _compare(own, state, shape_of or (lambda key: _stored_shape(state, key)))
    if mismatch:
        raise CheckpointError(_report_mismatch(mismatch, source, model))
    _check_dtypes(own, dtype_of or (lambda key: _stored_dtype(state, key)), source)
    report = LoadReport(skipped=list(skipped or []))
    parameters = {name for name, _ in model.named_parameters()}
    loaded = {key: _read_cast(key, target, state[key], key in parameters, device, dtype, report)
              for key, target in own.items()}
    model.load_state_dict(loaded, strict=True, assign=True)
    return report


def _read_cast(key: str, target: Tensor, tensor: Tensor, is_parameter: bool, device, dtype,
               report: LoadReport) -> Tensor:
    """One stored tensor as the model will hold it (dtype, device), counted in ``report``."""
    where = device
    if where is None:
        where = "cpu" if target.is_meta else target.device
    if dtype == "stored":
        want = tensor.dtype
    elif is_parameter and target.is_floating_point():
        want = dtype or target.dtype
    else:  # buffers keep the model's dtype: normaliser statistics stay float32
        want = target.dtype
    if tensor.dtype != want:
        conversion = f"{str(tensor.dtype).removeprefix('torch.')} -> "
        conversion += str(want).removeprefix("torch.")
        report.cast[conversion] = report.cast.get(conversion, 0) + 1
    report.nbytes += tensor.numel() * tensor.element_size()
    report.loaded += 1
    return tensor.to(device=where, dtype=want)


def load_checked(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    ignore_prefixes: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """One block's ``load_state_dict``, strictly, with the same check as
    [load_into][vlakit.core.load_into]: every missing, unexpected and mis-shaped key is
    named in one [`CheckpointError`][vlakit.core.CheckpointError] before anything loads.

    Keys under ``module.dropped_prefixes`` (parts a block removed, e.g. ``ViT.truncate()``)
    and under ``ignore_prefixes`` are skipped. The tensors are copied into the module's
    parameters (its dtype and device, no storage shared with ``state_dict``); a module on
    the ``meta`` device gets them assigned instead.
    """
    own = module.state_dict()
    skip = tuple(getattr(module, "dropped_prefixes", ())) + tuple(ignore_prefixes)
    state = {k: v for k, v in state_dict.items() if k in own or not (skip and k.startswith(skip))}
    mismatch = _compare(own, state, lambda key: tuple(state[key].shape))
    if mismatch:
        raise CheckpointError(_first_problems(mismatch, source, module))
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict({k: state[k] for k in own}, strict=True, assign=on_meta)


def _first_problems(mismatch: _Mismatch, source: str, module: nn.Module) -> str:
    """The mismatch, each kind led by its first key (a block's load names the key)."""
    name, parts = type(module).__name__, []
    if mismatch.unexpected:
        keys = mismatch.unexpected
        parts.append(f"unexpected {source} key {keys[0]!r} for {name} ({len(keys)} "
                     f"unexpected: {keys[:5]})")
    if mismatch.missing:
        keys = mismatch.missing
        parts.append(f"{source} lacks key {keys[0]!r} needed by {name} ({len(keys)} missing: "
                     f"{keys[:5]})")
    if mismatch.misshaped:
        key, stored, expected = mismatch.misshaped[0]
        parts.append(f"{source} key {key!r} has shape {stored}, expected {expected} "
                     f"({len(mismatch.misshaped)} mis-shaped)")
    return "; ".join(parts)


def guard_meta_loading(module: nn.Module) -> nn.Module:
    """Make ``load_state_dict`` fill parameters that are on the ``meta`` device, anywhere in
    ``module`` (torch's default copies into a meta tensor: a silent no-op, with a warning).

    With the guard, loading a state dict into ``module`` or any of its submodules replaces
    each meta parameter or buffer the state dict holds by the stored tensor, cast to the
    parameter's dtype (a bf16 checkpoint into an fp32-built model gives fp32), on the
    stored tensor's device. Integer tensors for a floating parameter raise a
    [CheckpointError][vlakit.core.CheckpointError] naming the key. Parameters that the
    state dict lacks stay on ``meta`` (``strict=True``, the default, reports them as
    missing). [VLA][vlakit.VLA] guards itself when it is built (blocks added later are not
    guarded). A load that then fails torch's own checks may leave some blocks filled: for
    all-or-nothing loading use [load_into][vlakit.core.load_into]. Returns ``module``.
    """
    for sub in module.modules():
        if not getattr(sub, "_guards_meta_loading", False):
            sub.register_load_state_dict_pre_hook(_fill_meta_tensors)
            sub._guards_meta_loading = True
    return module


def _fill_meta_tensors(module, state_dict, prefix, local_metadata, *args) -> None:
    if local_metadata.get("assign_to_params_buffers", False):
        return  # torch assigns already
    persistent = {k: v for k, v in module._buffers.items()
                  if v is not None and k not in module._non_persistent_buffers_set}
    for store, name, tensor in [
        *[(module._parameters, k, v) for k, v in module._parameters.items() if v is not None],
        *[(module._buffers, k, v) for k, v in persistent.items()],
    ]:
        key = prefix + name
        if not tensor.is_meta or key not in state_dict:
            continue
        value = state_dict[key]
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(tensor.shape):
            continue  # torch's own check reports the mismatch
        if tensor.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(
                f"{key!r} is stored as {value.dtype}, but the parameter is {tensor.dtype}: "
                f"quantised (integer) weights are not loaded into a floating model"
            )
        filled = value.detach().to(dtype=tensor.dtype)
        if store is module._parameters:
            store[name] = nn.Parameter(filled, requires_grad=tensor.requires_grad)
        else:
            store[name] = filled
