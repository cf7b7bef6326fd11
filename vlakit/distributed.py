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

from typing import Any

from torch import nn

from vlakit.decoders import TransformerDecoder
from vlakit.model import VLA
from vlakit.vision import ViTBlock

__all__ = ["fully_shard_vla", "shard_units"]

_DECODER_ENTRY_POINTS = ("embed_tokens", "logits")
_MODEL_ENTRY_POINTS = ("predict_action", "generate")


def shard_units(model: VLA) -> list[nn.Module]:
    """The per-block units, in order: every vision transformer block of the encoder, then
    every layer of an own [TransformerDecoder][vlakit.decoders.TransformerDecoder]."""
    units: list[nn.Module] = [m for m in model.encoder.modules() if isinstance(m, ViTBlock)]
    if isinstance(model.decoder, TransformerDecoder):
        units += list(model.decoder.layers)
    return units


def fully_shard_vla(model: VLA, **fsdp_kwargs: Any) -> VLA:
    """Apply FSDP2's ``fully_shard`` to ``model`` in place and return it.

    Shards each of [shard_units][vlakit.distributed.shard_units], then the encoder, the
    decoder (embedding, final norm and LM head; tied weights stay in one unit) and the
    root, and registers the extra entry points (``decoder.embed_tokens``,
    ``decoder.logits``, ``model.predict_action``, ``model.generate``) with
    ``register_fsdp_forward_method``.

    Args:
        model: the VLA (on its device, or on ``meta`` before materialising).
        **fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ``offload_policy``).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for unit in shard_units(model):
        fully_shard(unit, **fsdp_kwargs)
    if next(model.encoder.parameters(), None) is not None:
        fully_shard(model.encoder, **fsdp_kwargs)
    fully_shard(model.decoder, **fsdp_kwargs)
    for name in _DECODER_ENTRY_POINTS:
        register_fsdp_forward_method(model.decoder, name)
    fully_shard(model, **fsdp_kwargs)
    for name in _MODEL_ENTRY_POINTS:
        register_fsdp_forward_method(model, name)
    return model
