"""Action and proprio (un)normalisation with per-dataset statistics, as in OpenVLA and OFT."""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.actions._checks import as_tensor, check_finite, check_last_dim
from vlakit.core.recording import recorded

__all__ = ["ActionNormalizer", "load_norm_stats"]

# The modes (OpenVLA's ``NormalizationType`` values) and the two statistics each one reads.
_MODES: dict[str, tuple[str, str]] = {
    "bounds_q99": ("q01", "q99"),
    "bounds": ("min", "max"),
    "normal": ("mean", "std"),
}


def _stat_array(stats: Mapping[str, Any], stat: str, name: str) -> np.ndarray:
    value = stats[stat]
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{name} statistic '{stat}' must be a non-empty 1-d list (one value per "
            f"{name} dimension), got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array)).tolist()
        raise ValueError(f"{name} statistic '{stat}' has non-finite values at dims {bad}")
    return array


def _mask_array(stats: Mapping[str, Any], dim: int, name: str) -> np.ndarray:
    if stats.get("mask") is None:
        return np.ones(dim, dtype=bool)  # the reference's default: normalise every dim
    value = stats["mask"]
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 1 or array.shape[0] != dim:
        raise ValueError(
            f"{name} statistic 'mask' has shape {array.shape}, expected ({dim},) like the "
            f"other statistics"
        )
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} statistic 'mask' must be booleans, got {array.tolist()}")
        array = array.astype(bool)
    return array


_FORMS = ("pipeline", "oft_eval", "lerobot", "openpi")


@recorded
class ActionNormalizer(nn.Module):
    """Maps raw actions (or proprio) to the model's range and back, per dimension.

    Three modes, named as OpenVLA's ``NormalizationType``; ``low``/``high`` are the
    statistics the mode reads, ``mask`` selects the dimensions that are transformed
    (the others pass through unchanged, e.g. a gripper already in ``[0, 1]``):

    - ``"bounds_q99"`` (OpenVLA, OFT on LIBERO and Bridge): ``low, high = q01, q99``;
    - ``"bounds"`` (OFT on ALOHA): ``low, high = min, max``;

      normalize (``form="pipeline"``, the default):
      ``where(mask, clip(2 (x - low) / (high - low + eps) - 1, -1, 1), x)``, then ``0`` on
      *constant* dimensions (``min == max`` in the statistics, or ``low == high`` when
      min/max are absent), as OpenVLA's training data pipeline does;
      normalize (``form="oft_eval"``): ``clip(where(mask, 2 (x - low) / (high - low + eps)
      - 1, x), -1, 1)``, OpenVLA-OFT's evaluation-time proprio normalisation: masked-out
      dimensions are clipped too and constant dimensions are not zeroed;
      unnormalize: ``where(mask, 0.5 (y + 1) (high - low + eps) + low, y)``, not clipped;
      ``form="lerobot"`` (LeRobot's ``NormalizerProcessorStep``, QUANTILES / MIN_MAX; pi0,
      pi0.5): with ``r = high - low``, or ``eps`` where that is 0, normalize
      ``where(mask, 2 (x - low) / r - 1, x)`` and unnormalize ``where(mask, (y + 1) r / 2 +
      low, y)``: nothing clipped, constant dimensions not zeroed; ``form="openpi"``
      (openpi's quantile ``Normalize`` / ``Unnormalize``, with ``eps=1e-6``): normalize
      ``where(mask, 2 (x - low) / (high - low + eps) - 1, x)`` unclipped, unnormalize as
      ``"pipeline"``.
    - ``"normal"``: normalize ``where(mask, (x - mean) / (std + eps), x)``;
      unnormalize ``where(mask, y (std + eps) + mean, y)``; ``form="lerobot"`` (MEAN_STD)
      unnormalizes ``y std + mean``, without ``eps``.

    With the default ``eps=1e-8`` these are OpenVLA-OFT's formulas (normalisation in the data
    pipeline, unnormalisation in ``predict_action``). Original OpenVLA unnormalises without
    ``eps``: a difference of at most ``1e-8`` (below float32 resolution for ranges near 1);
    ``eps=0.0`` reproduces it exactly, at the price of a division by zero in normalize where
    ``high == low`` on a non-constant dimension.

    The statistics are buffers of shape ``[a]``: ``low`` and ``high`` (bounds modes) or
    ``mean`` and ``std`` (normal), ``mask`` (bool), and ``constant`` (bool, bounds modes).
    They follow the module's device but keep the dtype chosen here: a model-wide
    ``.to(torch.bfloat16)`` leaves them untouched, since bf16 would round q01/q99 to three
    significant digits. Results are computed and returned in the wider of the input's dtype
    and ``dtype`` (float32 for a bf16 input with the default).

    Build one per tensor kind: ``ActionNormalizer.from_stats(stats, key="action")`` and
    ``key="proprio"`` (OFT normalises proprio with the same mode, using the proprio
    statistics).

    Args:
        stats: statistics of one tensor kind, OpenVLA's ``norm_stats[dataset][key]``: a
            mapping with (at least) the two statistics the mode reads, lists or 1-d arrays of
            length ``a``; optionally ``"mask"`` (booleans, default all ``True``) and, in the
            bounds modes, ``"min"``/``"max"`` (to find constant dimensions). Other keys are
            ignored.
        mode: ``"bounds_q99"``, ``"bounds"`` or ``"normal"``.
        eps: added to ``high - low`` (or to ``std``) in both directions.
        check_finite: raise on NaN or infinite inputs (skipped while ``torch.compile``
            traces).
        name: what the tensor is called in error messages (``"action"``, ``"proprio"``).
        dtype: dtype of the statistic buffers; ``torch.float64`` reproduces numpy
            references bit for bit on float64 inputs.
        form: ``"pipeline"``, ``"oft_eval"``, ``"lerobot"`` or ``"openpi"``: which formulas
            (above);
            ``"pipeline"`` and ``"oft_eval"`` differ in the bounds modes' ``normalize`` only.
    """

    def __init__(
        self,
        stats: Mapping[str, Any],
        mode: str = "bounds_q99",
        *,
        eps: float = 1e-8,
        check_finite: bool = True,
        name: str = "action",
        dtype: torch.dtype = torch.float32,
        form: str = "pipeline",
    ) -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"form must be one of {list(_FORMS)}, got {form!r}")
        if mode not in _MODES:
            raise ValueError(f"unknown normalization mode {mode!r}; choose one of {list(_MODES)}")
        if not (eps >= 0.0 and np.isfinite(eps)):
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        needed = _MODES[mode]
        missing = [stat for stat in needed if stats.get(stat) is None]
        if missing:
            raise KeyError(
                f"mode {mode!r} needs {name} statistics {list(needed)}, missing {missing} "
                f"(available: {sorted(stats)})"
            )
        self.mode = mode
        self.form = form
        self.eps = float(eps)
        self.check_finite = check_finite
        self.name = name

        first, second = (_stat_array(stats, stat, name) for stat in needed)
        if first.shape != second.shape:
            raise ValueError(
                f"{name} statistics '{needed[0]}' and '{needed[1]}' differ in length: "
                f"{first.shape[0]} vs {second.shape[0]}"
            )
        dim = first.shape[0]
        mask = _mask_array(stats, dim, name)
        self.dim = dim

        if mode == "normal":
            if (second < 0).any():
                bad = np.flatnonzero(second < 0).tolist()
                raise ValueError(f"{name} statistic 'std' is negative at dims {bad}")
            self.register_buffer("mean", torch.tensor(first, dtype=dtype))
            self.register_buffer("std", torch.tensor(second, dtype=dtype))
        else:
            if (second < first).any():
                bad = np.flatnonzero(second < first).tolist()
                raise ValueError(
                    f"{name} statistic '{needed[1]}' is below '{needed[0]}' at dims {bad}"
                )
            if stats.get("min") is not None and stats.get("max") is not None:
                low_all, high_all = _stat_array(stats, "min", name), _stat_array(stats, "max", name)
                if low_all.shape != (dim,) or high_all.shape != (dim,):
                    raise ValueError(
                        f"{name} statistics 'min'/'max' have lengths {low_all.shape[0]}/"
                        f"{high_all.shape[0]}, expected {dim}"
                    )
                constant = low_all == high_all
            else:
                constant = first == second
            self.register_buffer("low", torch.tensor(first, dtype=dtype))
            self.register_buffer("high", torch.tensor(second, dtype=dtype))
            self.register_buffer("constant", torch.tensor(constant, dtype=torch.bool))
        self.register_buffer("mask", torch.tensor(mask, dtype=torch.bool))
        # the values on the host, so reset_parameters can refill buffers after to_empty
        self._host_values = {"first": first, "second": second, "mask": mask}
        self._host_values["constant"] = None if mode == "normal" else constant

    def reset_parameters(self) -> None:
        """Refill the statistics buffers from the values given at construction (a normalizer
        built on ``meta`` and materialised with ``to_empty`` holds garbage until then;
        [`init_parameters`][vlakit.core.init_parameters] calls this)."""
        values = self._host_values
        sources = {"mask": values["mask"]}
        if self.mode == "normal":
            sources.update(mean=values["first"], std=values["second"])
        else:
            sources.update(low=values["first"], high=values["second"],
                           constant=values["constant"])
        with torch.no_grad():
            for name, value in sources.items():
                buffer = getattr(self, name)
                if buffer.is_meta:
                    continue
                buffer.copy_(torch.as_tensor(value, dtype=buffer.dtype))

    @classmethod
    def from_stats(
        cls,
        norm_stats: Mapping[str, Any],
        unnorm_key: str | None = None,
        mode: str = "bounds_q99",
        key: str = "action",
        *,
        eps: float = 1e-8,
        check_finite: bool = True,
        dtype: torch.dtype = torch.float32,
        form: str = "pipeline",
    ) -> "ActionNormalizer":
        """Build from OpenVLA's ``norm_stats``: ``{dataset: {"action": {...}, "proprio": ...}}``.

        Args:
            norm_stats: the per-dataset statistics (``config.json``'s ``norm_stats`` or a
                ``dataset_statistics.json``; see ``load_norm_stats``).
            unnorm_key: the dataset to use; may be ``None`` only when there is exactly one.
            mode: see the class docstring.
            key: which tensor kind: ``"action"`` or ``"proprio"``.
            eps: see the class docstring.
            check_finite: see the class docstring.
            dtype: see the class docstring.
            form: see the class docstring.

        Raises:
            KeyError: ``unnorm_key`` or ``key`` is not present (the message lists what is),
                or a statistic the mode needs is missing.
            ValueError: ``unnorm_key`` is ``None`` and there is not exactly one dataset.
        """
        datasets = sorted(norm_stats)
        if unnorm_key is None:
            if len(norm_stats) != 1:
                raise ValueError(
                    f"unnorm_key is required: the statistics cover {len(norm_stats)} datasets; "
                    f"choose one of {datasets}"
                )
            unnorm_key = datasets[0]
        if unnorm_key not in norm_stats:
            raise KeyError(f"unknown unnorm_key {unnorm_key!r}; available datasets: {datasets}")
        dataset_stats = norm_stats[unnorm_key]
        if not isinstance(dataset_stats, Mapping) or not isinstance(
            dataset_stats.get(key), Mapping
        ):
            available = (
                sorted(k for k, v in dataset_stats.items() if isinstance(v, Mapping))
                if isinstance(dataset_stats, Mapping)
                else []
            )
            raise KeyError(
                f"dataset {unnorm_key!r} has no {key!r} statistics; available: {available}"
            )
        return cls(
            dataset_stats[key], mode, eps=eps, check_finite=check_finite, name=key, dtype=dtype,
            form=form,
        )

    def _prepare(
        self, x: Tensor | np.ndarray, first: Tensor, second: Tensor, method: str
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Checks ``x``; returns it and the statistics in the compute dtype, on its device."""
        x = as_tensor(x, self.name)
        what = f"{self.name} passed to {type(self).__name__}.{method}"
        check_last_dim(x, self.dim, what, f"the length of the {self.name} statistics")
        if self.check_finite:
            check_finite(x, what)
        dtype = torch.promote_types(x.dtype, first.dtype)
        # The statistics are [a]-sized: moving them to the input's device (a no-op when the
        # module already lives there) lets numpy or CPU outputs be unnormalised directly.
        first = first.to(device=x.device, dtype=dtype)
        second = second.to(device=x.device, dtype=dtype)
        return x.to(dtype), first, second, self.mask.to(x.device)

    def normalize(
        self, x: Float[Tensor, "*batch a"] | Float[np.ndarray, "*batch a"]
    ) -> Float[Tensor, "*batch a"]:
        """Raw values ``[*batch, a]`` → normalised ``[*batch, a]`` (see the class docstring)."""
        if self.mode == "normal":
            x, mean, std, mask = self._prepare(x, self.mean, self.std, "normalize")
            return torch.where(mask, (x - mean) / (std + self.eps), x)
        x, low, high, mask = self._prepare(x, self.low, self.high, "normalize")
        if self.form == "lerobot":
            return torch.where(mask, 2 * (x - low) / self._range(low, high) - 1, x)
        if self.form == "openpi":
            return torch.where(mask, 2 * (x - low) / (high - low + self.eps) - 1, x)
        if self.form == "oft_eval":
            return torch.where(mask, 2 * (x - low) / (high - low + self.eps) - 1, x).clamp(-1, 1)
        y = (2 * (x - low) / (high - low + self.eps) - 1).clamp(-1.0, 1.0)
        y = torch.where(mask, y, x)
        return torch.where(self.constant.to(y.device), torch.zeros_like(y), y)

    def unnormalize(
        self, y: Float[Tensor, "*batch a"] | Float[np.ndarray, "*batch a"]
    ) -> Float[Tensor, "*batch a"]:
        """Normalised values ``[*batch, a]`` → raw ``[*batch, a]`` (see the class docstring)."""
        if self.mode == "normal":
            y, mean, std, mask = self._prepare(y, self.mean, self.std, "unnormalize")
            scale = std if self.form == "lerobot" else std + self.eps
            return torch.where(mask, y * scale + mean, y)
        y, low, high, mask = self._prepare(y, self.low, self.high, "unnormalize")
        if self.form == "lerobot":
            return torch.where(mask, (y + 1) * self._range(low, high) / 2 + low, y)
        return torch.where(mask, 0.5 * (y + 1) * (high - low + self.eps) + low, y)

    def _range(self, low: Tensor, high: Tensor) -> Tensor:
        """LeRobot's denominator: ``high - low``, ``eps`` where that is 0."""
        span = high - low
        return torch.where(span == 0, torch.full_like(span, self.eps), span)

    def _apply(self, fn: Any, recurse: bool = True) -> "ActionNormalizer":
        # Buffers follow device moves but keep their dtype (see the class docstring). The
        # module has no parameters or children, so handling the buffers is all of _apply.
        for key, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                if buf.is_meta or moved.is_meta:
                    moved = moved.to(buf.dtype)
                else:
                    moved = buf.to(device=moved.device)
            self._buffers[key] = moved
        return self

    def extra_repr(self) -> str:
        form = "" if self.form == "pipeline" else f", form={self.form!r}"
        return f"{self.name!r}, mode={self.mode!r}, dim={self.dim}, eps={self.eps}{form}"


def load_norm_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read OpenVLA-style normalisation statistics: ``{dataset: {"action": {...}, ...}}``.

    ``path`` is a checkpoint's ``config.json`` (the ``norm_stats`` field), a
    ``dataset_statistics.json`` (the mapping itself), or a directory holding either
    (``config.json`` with ``norm_stats`` is preferred).
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "config.json", path / "dataset_statistics.json"]
        for candidate in candidates:
            if candidate.is_file():
                data = json.loads(candidate.read_text())
                if candidate.name == "config.json" and not data.get("norm_stats"):
                    continue
                return _norm_stats_from(data, candidate)
        raise FileNotFoundError(
            f"no normalisation statistics in {path}: looked for config.json with a "
            f"'norm_stats' field and for dataset_statistics.json"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return _norm_stats_from(json.loads(path.read_text()), path)


def _norm_stats_from(data: Any, path: Path) -> dict[str, Any]:
    if isinstance(data, dict) and "norm_stats" in data:
        data = data["norm_stats"]
        if not isinstance(data, dict) or not data:
            raise ValueError(f"{path} has an empty 'norm_stats' field: {data!r}")
    if (
        isinstance(data, dict)
        and data
        and all(
            isinstance(entry, dict) and isinstance(entry.get("action"), dict)
            for entry in data.values()
        )
    ):
        return data
    found = f"top-level keys {sorted(data)}" if isinstance(data, dict) else (
        f"a JSON {type(data).__name__}"
    )
    raise ValueError(
        f"{path} does not hold normalisation statistics: expected a 'norm_stats' field or a "
        f"mapping {{dataset: {{'action': {{...}}}}}}, found {found}"
    )
