"""Checks for modules sharded with FSDP2 that vlakit calls outside their ``forward``.

Lives in the core so that blocks (a decoder's ``embed_tokens``) and the model
(``predict_action``) can call it; it imports nothing of vlakit and reads FSDP2 only when
torch's FSDP module has been imported (nothing is sharded otherwise).
"""

import torch
from torch import nn

__all__ = ["check_gathered"]


def check_gathered(module: nn.Module, entry: str, uses: nn.Module | None = None) -> None:
    """Raise a ``RuntimeError`` naming ``entry`` if ``module`` is an FSDP2 unit whose own
    parameters (those under ``uses``, a submodule that ``entry`` calls; default all of
    them) are sharded right now.

    ``entry`` is a method vlakit runs outside ``module.forward`` (``embed_tokens``,
    ``logits``, ``predict_action``, ...): unless it was registered with
    ``register_fsdp_forward_method``, FSDP2 never all-gathers the unit's parameters for it,
    and the call would fail inside torch with DTensor's "got mixed torch.Tensor and DTensor".
    Sharding by hand (``fully_shard`` per layer, then the decoder or the root, torchtitan's
    habit) ends here; [fully_shard_vla][vlakit.distributed.fully_shard_vla] registers every
    entry point. Parameters inside a unit of their own (an embedding sharded by itself) are
    gathered by that unit's forward and not checked. Does nothing for a module that is not
    sharded, and nothing while compiling.
    """
    if torch.compiler.is_compiling() or not _is_fsdp_module(module):
        return
    probe = _own_parameter(module, module if uses is None else uses)
    if probe is None:
        return
    owner, name = probe
    from torch.distributed.tensor import DTensor

    if isinstance(owner._parameters[name], DTensor):
        kind = type(module).__name__.removeprefix("FSDP")
        raise RuntimeError(
            f"{kind}.{entry} runs outside {kind}.forward on a module sharded with FSDP2, "
            f"and {entry} is not registered as a forward method, so its parameters are "
            f"still sharded; shard the model with vlakit.distributed.fully_shard_vla(model, "
            f"...) (it shards the same units and registers every entry point), or call "
            f"torch.distributed.fsdp.register_fsdp_forward_method(module, {entry!r}) for "
            f"each method vlakit runs outside forward (see fully_shard_vla's docs)"
        )


def _is_fsdp_module(module: nn.Module) -> bool:
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp")  # never sharded if FSDP was not imported
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def _own_parameter(unit: nn.Module, uses: nn.Module) -> tuple[nn.Module, str] | None:
    """``(submodule, name)`` of one parameter under ``uses`` that belongs to ``unit``'s own
    FSDP2 group (not to a unit nested in it), cached on ``unit``; ``None`` if there is
    none."""
    cache = unit.__dict__.setdefault("_vlakit_own_parameter", [])  # [(uses, probe)]
    for known, probe in cache:
        if known is uses:
            return probe
    nested: set[int] = set()
    for sub in unit.modules():
        if sub is not unit and _is_fsdp_module(sub):
            nested.update(id(m) for m in sub.modules())
    found = None
    for sub in uses.modules():
        name = next((n for n, p in sub._parameters.items() if p is not None), None)
        if id(sub) not in nested and name is not None:
            found = (sub, name)
            break
    cache.append((uses, found))
    return found
