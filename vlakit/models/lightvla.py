"""LightVLA: OpenVLA-OFT with a parameter-free token pruner in front of the Llama.

The family file: the builders ([lightvla_7b][vlakit.models.lightvla_7b], the component
builder [lightvla][vlakit.models.lightvla.lightvla]) and the loader of a LightVLA run
folder, [load_lightvla][vlakit.models.load_lightvla] (an OFT run folder: the pruner has no
weights).
"""

import os
from typing import Any

from torch import nn

from vlakit.bundle import ObservationKeys, PolicyBundle
from vlakit.core import LoadReport
from vlakit.model import VLA
from vlakit.models._common import policy_bundle
from vlakit.models.openvla_oft import load_openvla_oft, openvla_oft, openvla_oft_7b
from vlakit.processors import OpenVLAProcessor
from vlakit.pruners import LightVLAPruner

__all__ = ["lightvla", "lightvla_7b", "load_lightvla", "lightvla_policy"]


def lightvla(*, pruner: nn.Module | None = None, **parts: Any) -> VLA:
    """Component builder: [openvla_oft][vlakit.models.openvla_oft.openvla_oft] from any
    blocks, with a [LightVLAPruner][vlakit.pruners.LightVLAPruner] (or the ``pruner``
    given) before the first decoder layer. ``parts``: ``openvla_oft``'s arguments
    (``encoder``, ``projector``, ``decoder``, ``head``, ...)."""
    return openvla_oft(pruner=LightVLAPruner() if pruner is None else pruner, **parts)


def lightvla_7b(
    head: str = "l1",
    num_views: int | None = None,
    proprio_dim: int | None = 8,
    chunk_size: int = 8,
    action_dim: int = 7,
    film: bool = False,
    attention: str = "bidirectional",
    *,
    pruner: nn.Module | None = None,
    predict_read: str | None = "next",
    **kwargs: Any,
) -> VLA:
    """LightVLA at full size: [openvla_oft_7b][vlakit.models.openvla_oft_7b] (same
    arguments, same 7,709,173,191 parameters in the LIBERO configuration: the pruner has
    none) with a [LightVLAPruner][vlakit.pruners.LightVLAPruner] before Llama layer 0.

    The pruner finds the image tokens by role, so the number of views is whatever the
    batch brings (``num_views=None``, the default here; LIBERO uses 2): no
    ``set_num_images_in_input``.

    ``head``, ``proprio_dim``, ``chunk_size``, ``action_dim``, ``film`` and ``attention``
    are ``openvla_oft_7b``'s.

    Args:
        num_views: camera views per example, checked on every batch; ``None`` (default):
            any count.
        pruner: another pruner in place of ``LightVLAPruner()``.
        predict_read: the head's read at prediction. ``"next"`` (default) is what the
            released LightVLA ``predict_action`` does: it reads the last ``chunk * a``
            positions (slots ``2..m`` and ``</s>``) while training reads the state before
            each slot, as OFT does; ``None`` predicts with the training read.
        **kwargs: the rest of ``openvla_oft_7b``'s keyword arguments (``dtype``,
            ``device``, ``num_inference_steps``, normalisers, ...).
    """
    return openvla_oft_7b(
        head, num_views, proprio_dim, chunk_size, action_dim, film, attention,
        pruner=LightVLAPruner() if pruner is None else pruner,
        predict_read=None if head == "flow" else predict_read,
        **kwargs,
    )


def load_lightvla(
    path: str | os.PathLike, unnorm_key: str | None = None, **kwargs
) -> VLA | tuple[VLA, LoadReport]:
    """A LightVLA run directory: [load_openvla_oft][vlakit.models.load_openvla_oft] with a
    [LightVLAPruner][vlakit.pruners.LightVLAPruner] (it has no weights) and the released
    prediction read (``predict_read="next"``, see [lightvla_7b][vlakit.models.lightvla_7b]);
    ``kwargs`` as ``load_openvla_oft``'s (``num_views`` included: the pruner finds the image
    tokens by role, so any count works, but a given one is checked)."""
    kwargs.setdefault("pruner", LightVLAPruner())
    kwargs.setdefault("predict_read", "next")
    return load_openvla_oft(path, unnorm_key, **kwargs)


def lightvla_policy(
    path: str | os.PathLike,
    unnorm_key: str | None = None,
    *,
    keys: ObservationKeys | None = None,
    tokenizer: Any = None,
    **load_options: Any,
) -> PolicyBundle:
    """A LightVLA run directory as a [PolicyBundle][vlakit.bundle.PolicyBundle]:
    [load_lightvla][vlakit.models.load_lightvla]'s model with OFT's processor options (see
    [openvla_oft_policy][vlakit.models.openvla_oft_policy]).

    Args:
        path: the directory (it must hold the tokenizer's files, as OpenVLA's
            releases do, unless ``tokenizer`` is given).
        unnorm_key: as the loader's.
        keys: the observation keys the policy reads (default
            [ObservationKeys.for_model][vlakit.bundle.ObservationKeys.for_model]: openpi's
            LIBERO keys, as many cameras as the model reads).
        tokenizer: the tokenizer, instead of the one in ``path``.
        **load_options: the loader's other keyword arguments (not ``return_report``).
    """
    model = load_lightvla(path, unnorm_key, **load_options)
    return policy_bundle(model, path, OpenVLAProcessor, keys, tokenizer, lowercase=True)
