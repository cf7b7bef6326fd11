"""peft's LoRA adapter folders, merged into the base checkpoint as it is read.

``merge_lora_weight`` is the one merge, ``W + scale * B @ A`` in float32 back to the stored
dtype; OpenVLA-OFT's FiLM vision file (peft LoRA layers inside) merges through it too.
"""

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from vlakit.core.checkpoint import CheckpointError, CheckpointView

__all__ = ["LoraAdapter", "MergedCheckpoint", "merge_lora_weight"]

_PREFIX = "base_model.model."


class LoraAdapter:
    """A peft LoRA adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors``
    (or ``adapter_model.bin``, read with ``weights_only=True``).

    Plain LoRA only: ``peft_type`` ``"LORA"``, no DoRA, ``bias="none"``, no
    ``fan_in_fan_out``, no ``modules_to_save``; anything else raises a
    [CheckpointError][vlakit.core.CheckpointError] naming the setting. ``deltas`` maps
    each adapted base weight (the checkpoint's key, ``base_model.model.`` removed) to its
    pair; [delta][vlakit.convert.LoraAdapter.delta] is ``scale * B @ A`` with ``scale =
    alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``r`` the stored rank (so
    ``rank_pattern`` needs nothing more) and ``alpha`` per module from ``alpha_pattern``.
    Keys may carry peft's adapter name (``lora_A.default.weight``).

    Args:
        path: the adapter folder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} has no adapter_config.json: not a peft adapter folder")
        config = json.loads(config_file.read_text())
        self.path, self.config = path, config
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{config_file}: peft_type {config.get('peft_type')!r} is not "
                                  f"supported (LoRA adapters only)")
        for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"),
                        ("modules_to_save", None), ("lora_bias", False)):
            if config.get(key, ok) not in (ok, [] if ok is None else ok):
                raise CheckpointError(f"{config_file}: {key}={config.get(key)!r} is not "
                                      f"supported (plain LoRA: {key}={ok!r})")
        weights = self._weights(path)
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, value in weights.items():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight", name)
            if match is None:
                raise CheckpointError(
                    f"adapter key {key!r} is not a LoRA A/B weight (LoRA biases, embeddings "
                    f"and other trained modules are not supported)"
                )
            module, part = match.groups()
            pairs.setdefault(f"{module}.weight", {})[part] = value
        for target, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise CheckpointError(f"adapter for {target!r} lacks its "
                                      f"{({'lora_A', 'lora_B'} - set(pair)).pop()}")
        self.pairs = pairs

    @staticmethod
    def _weights(path: Path) -> dict[str, Tensor]:
        from vlakit.core.checkpoint import CheckpointFiles, read_torch_weights

        if (path / "adapter_model.safetensors").is_file():
            with CheckpointFiles(path / "adapter_model.safetensors") as files:
                return {k: files[k] for k in files}
        if (path / "adapter_model.bin").is_file():
            return read_torch_weights(path / "adapter_model.bin")
        raise CheckpointError(f"{path} has neither adapter_model.safetensors nor adapter_model.bin")

    def scale(self, target: str) -> float:
        r"""``alpha / r`` for the module of ``target`` (rsLoRA: ``alpha / sqrt(r)``): ``r``
        is the stored rank (``lora_A``'s rows), ``alpha`` the config's ``lora_alpha`` or
        the first ``alpha_pattern`` key matching the module name as peft matches them
        (``re.match(rf"(.*\.)?({key})$", name)``)."""
        module = target[: -len(".weight")]
        r = self.pairs[target]["lora_A"].shape[0]
        alpha = self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)

    def delta(self, target: str) -> Tensor:
        """``scale * B @ A`` for the base weight ``target`` (float32)."""
        pair = self.pairs[target]
        return self.scale(target) * (pair["lora_B"].float() @ pair["lora_A"].float())


class MergedCheckpoint(CheckpointView):
    """A checkpoint mapping whose adapted weights come back merged: ``W + scale * B @ A``,
    computed in float32 and returned in the stored dtype. Shapes and dtypes pass through
    (``shape(key)``, ``dtype(key)`` when the base has them). Every adapted weight must exist
    in the base with the adapter's shape, else a
    [CheckpointError][vlakit.core.CheckpointError] names it (an adapter for another model).
    """

    def __init__(self, base: Mapping, adapter: LoraAdapter) -> None:
        super().__init__(base)
        self.adapter = adapter
        for target, pair in adapter.pairs.items():
            if target not in base:
                raise CheckpointError(
                    f"the adapter in {adapter.path} adapts {target!r}, which the base "
                    f"checkpoint does not have: an adapter for other layers or another model"
                )
            out, rank = pair["lora_B"].shape
            inp = pair["lora_A"].shape[1]
            shape = base.shape(target) if hasattr(base, "shape") else tuple(base[target].shape)
            if tuple(shape) != (out, inp):
                raise CheckpointError(
                    f"the adapter's {target!r} is {out} x {inp} (rank {rank}), but the base "
                    f"weight is {tuple(shape)}"
                )

    def _read(self, source: str) -> Tensor:
        value = self.base[source]
        pair = self.adapter.pairs.get(source)
        if pair is not None:
            value = merge_lora_weight(value, pair["lora_A"], pair["lora_B"],
                                      self.adapter.scale(source))
        return value


def merge_lora_weight(base: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``base + scale * B @ A``, computed in float32 and returned in ``base``'s dtype."""
    return (base.float() + scale * (b.float() @ a.float())).to(base.dtype)
