"""Strict state-dict loading that names the offending key (shared by every block family)."""

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

__all__ = ["CheckpointError", "load_checked"]


class CheckpointError(KeyError, ValueError):
    """A checkpoint key is unknown, missing, or has the wrong shape.

    Both a ``KeyError`` (a key problem) and a ``ValueError`` (a bad checkpoint), so callers
    catching either see it.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def load_checked(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    ignore_prefixes: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """``load_state_dict`` that names the offending key on any mismatch.

    Keys under ``module.dropped_prefixes`` (parts a block removed, e.g. ``ViT.truncate()``)
    and under ``ignore_prefixes`` are skipped. A module on the ``meta`` device gets the
    checkpoint tensors assigned instead of copied. Raises
    [`CheckpointError`][vlakit.core.CheckpointError] for an
    unexpected key, a missing key, or a shape mismatch.
    """
    own = module.state_dict()
    skip = tuple(getattr(module, "dropped_prefixes", ())) + tuple(ignore_prefixes)
    unexpected = [k for k in state_dict if k not in own and not (skip and k.startswith(skip))]
    if unexpected:
        raise CheckpointError(
            f"unexpected {source} key {unexpected[0]!r} for {type(module).__name__} "
            f"({len(unexpected)} unexpected: {unexpected[:5]})"
        )
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"{source} lacks key {missing[0]!r} needed by {type(module).__name__} "
            f"({len(missing)} missing: {missing[:5]})"
        )
    for key, tensor in own.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source} key {key!r} has shape {tuple(state_dict[key].shape)}, expected "
                f"{tuple(tensor.shape)}"
            )
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict({k: state_dict[k] for k in own}, strict=True, assign=on_meta)
