"""Strict state-dict loading that names the offending key (shared by every block family)."""

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

__all__ = ["CheckpointError", "load_checked", "guard_meta_loading"]


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
