"""Sharding a VLA with FSDP2: one unit per decoder layer and per vision block.

Launch with ``torchrun`` and call [fully_shard_vla][vlakit.distributed.fully_shard_vla] on
the model (after activation checkpointing and per-block ``torch.compile``, if used: the
units it shards are [shard_units][vlakit.distributed.shard_units]). vlakit writes no
launcher.

Every parameter is used inside some module's ``forward``, or inside a method registered
with FSDP2 as a forward: the decoder's ``embed_tokens`` and ``logits`` (the interleaver
embeds the prompt before the decoder runs; heads read logits after it), and the model's
``predict_action`` and ``generate`` (which run the decoder without ``VLA.forward``).
"""

import dataclasses
from typing import Any

from torch import nn

from vlakit.decoders import TransformerDecoder
from vlakit.model import VLA
from vlakit.vision import ViTBlock

__all__ = ["fully_shard_vla", "shard_units"]

_DECODER_ENTRY_POINTS = ("embed_tokens", "logits")
_HEAD_ENTRY_POINTS = ("place", "loss", "prefix_loss", "predict")
_MODEL_ENTRY_POINTS = (
    "predict_action",
    "generate",
    "image_tokens",
    "encode_images",
    "film_condition",
    "place_head_tokens",
    "build_sequence",
    "decode",
)


def shard_units(model: VLA) -> list[nn.Module]:
    """The per-block units, in order: every transformer block of the encoder, then every
    layer of the decoder.

    vlakit's own blocks are found by type ([ViTBlock][vlakit.vision.ViTBlock], the
    [TransformerDecoder][vlakit.decoders.TransformerDecoder]'s layers); inside wrapped
    models (timm, open_clip, transformers) the blocks are the children of their block lists
    (``blocks``, ``layers``, ``resblocks``: a ``ModuleList`` or ``Sequential`` of one
    block type).
    """
    units: list[nn.Module] = [m for m in model.encoder.modules() if isinstance(m, ViTBlock)]
    if not units:
        units += _block_lists(model.encoder)
    if isinstance(model.decoder, TransformerDecoder):
        units += list(model.decoder.layers)
    else:
        units += _block_lists(model.decoder)
    return units


_BLOCK_LIST_NAMES = ("blocks", "layers", "resblocks", "layer", "h")


def _block_lists(module: nn.Module) -> list[nn.Module]:
    """Children of every ``nn.ModuleList`` named like a block list whose children all share
    one type and hold parameters (not nested inside another such list)."""
    found: list[nn.Module] = []
    taken: set[int] = set()
    for name, sub in module.named_modules():
        is_list = isinstance(sub, (nn.ModuleList, nn.Sequential))
        if not is_list or name.rsplit(".", 1)[-1] not in _BLOCK_LIST_NAMES:
            continue
        children = list(sub)
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        if any(id(m) in taken for m in sub.modules()) or not any(
            True for _ in children[0].parameters()
        ):
            continue
        found += children
        taken.update(id(m) for m in sub.modules())
    return found


def fully_shard_vla(model: VLA, **fsdp_kwargs: Any) -> VLA:
    """Apply FSDP2's ``fully_shard`` to ``model`` in place and return it.

    Shards each of [shard_units][vlakit.distributed.shard_units], then the encoder, the
    projector, the proprio projector, the head and the pruner (those that have
    parameters), the decoder (embedding, final norm and LM head; tied weights stay in one
    unit) and the root. Registers the entry points that run outside ``forward`` with
    ``register_fsdp_forward_method``: the decoder's ``embed_tokens`` and ``logits``, the
    head's ``place``, ``loss`` and ``predict``, and the model's ``predict_action``,
    ``generate`` and the pieces a [VLARunner][vlakit.runner.VLARunner] calls
    (``image_tokens``, ``build_sequence``, ...), so every public path works on a sharded
    model.

    Args:
        model: the VLA (on its device, or on ``meta`` before materialising).
        **fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ``offload_policy``); the root's and the head's
            ``mp_policy`` get ``cast_forward_inputs=False`` so target actions are never
            rounded to the compute dtype before normalisation.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # The root and the head take raw target actions: a mixed-precision policy must not round
    # them to bf16 before normalisation (that moves action tokens). The model casts pixels
    # and proprio to its modules' dtypes itself; inner units still cast their own inputs.
    outer_kwargs = dict(fsdp_kwargs)
    policy = fsdp_kwargs.get("mp_policy")
    if policy is not None and getattr(policy, "cast_forward_inputs", False):
        outer_kwargs["mp_policy"] = dataclasses.replace(policy, cast_forward_inputs=False)
    for unit in shard_units(model):
        fully_shard(unit, **fsdp_kwargs)
    for name in ("encoder", "projector", "proprio_projector", "pruner", "head"):
        part = getattr(model, name, None)
        if part is not None and next(part.parameters(), None) is not None:
            fully_shard(part, **(outer_kwargs if name == "head" else fsdp_kwargs))
            if name == "head":
                for method in _HEAD_ENTRY_POINTS:
                    if callable(getattr(part, method, None)):
                        register_fsdp_forward_method(part, method)
    fully_shard(model.decoder, **fsdp_kwargs)
    for name in _DECODER_ENTRY_POINTS:
        register_fsdp_forward_method(model.decoder, name)
    fully_shard(model, **outer_kwargs)
    for name in _MODEL_ENTRY_POINTS:
        register_fsdp_forward_method(model, name)
    return model
