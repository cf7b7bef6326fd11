"""OpenVLA-OFT: OpenVLA's towers and Llama, a whole action chunk decoded in one pass by a
continuous head, optional proprio token, wrist views and FiLM.

The family file: the builders ([openvla_oft_7b][vlakit.models.openvla_oft_7b], the
component builder [openvla_oft][vlakit.models.openvla_oft.openvla_oft],
[oft_head][vlakit.models.oft_head], [oft_mask][vlakit.models.oft_mask]) and the loader of an
OFT run folder, [load_openvla_oft][vlakit.models.load_openvla_oft]: OpenVLA's directory
reader and weight map (``vlakit/models/openvla.py``) plus OFT's component files, the head
read from their shapes and the platform constants.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlakit.actions import ActionNormalizer
from vlakit.bundle import ObservationKeys, PolicyBundle
from vlakit.convert.openvla import read_oft_components
from vlakit.core import (
    BidirectionalMask,
    CausalMask,
    CheckpointError,
    CheckpointView,
    LinearFactory,
    LoadReport,
    MaskPolicy,
    ParallelDecodingMask,
    building,
)
from vlakit.heads import DiffusionActionHead, FlowMatchingHead, L1RegressionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.language import OFTLanguageVector
from vlakit.model import VLA
from vlakit.models._common import policy_bundle
from vlakit.models.openvla import (
    _load_prismatic,
    _openvla_7b_parts,
    _prismatic_blocks,
    _read_prismatic,
)
from vlakit.processors import OpenVLAProcessor
from vlakit.projectors import ProprioProjector

__all__ = ["openvla_oft", "openvla_oft_7b", "oft_head", "oft_mask", "load_openvla_oft",
           "openvla_oft_policy"]

ATTENTIONS = ("bidirectional", "causal", "parallel")
HEADS = ("l1", "diffusion", "flow")


def oft_mask(attention: str) -> MaskPolicy:
    """The mask policy for ``attention``: ``"bidirectional"`` (OFT: every token sees every
    token; its transformers fork does this in the SDPA path only), ``"causal"`` (what OFT
    runs under stock transformers, and under its eager or flash attention), or
    ``"parallel"`` (prefix causal, the suffix one block:
    [ParallelDecodingMask][vlakit.core.ParallelDecodingMask]; lets iterative heads cache the
    prefix)."""
    if attention == "bidirectional":
        return BidirectionalMask()
    if attention == "causal":
        return CausalMask()
    if attention == "parallel":
        return ParallelDecodingMask("causal")
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")


def oft_head(
    head: str,
    hidden_size: int,
    chunk_size: int,
    action_dim: int,
    attention: str = "bidirectional",
    *,
    mlp_dim: int | None = None,
    num_blocks: int = 2,
    num_inference_steps: int | None = None,
    layout: str | None = None,
    scheduler=None,
    predict_read: str | None = None,
) -> nn.Module:
    """OFT's action head by name: ``"l1"``
    ([L1RegressionHead][vlakit.heads.L1RegressionHead]), ``"diffusion"``
    ([DiffusionActionHead][vlakit.heads.DiffusionActionHead]) or ``"flow"``
    ([FlowMatchingHead][vlakit.heads.FlowMatchingHead]).

    ``layout`` defaults to what ``attention`` allows: under ``"bidirectional"`` the prefix
    sees the slots, so iterative heads re-run the whole sequence per step (diffusion:
    ``"oft"``, flow: ``"full"``); under ``"causal"``/``"parallel"`` they cache the prefix
    (``"cached"``). ``num_inference_steps``: denoising steps (diffusion, default 50) or
    Euler steps (flow, default 10); ``"l1"`` ignores it. ``predict_read``: the slot read at
    prediction (``"l1"``, ``"diffusion"``; LightVLA's release: ``"next"``). Arguments a head
    cannot take (a ``layout`` or ``scheduler`` for ``"l1"``; ``scheduler``, ``mlp_dim``,
    ``num_blocks`` or ``predict_read`` for ``"flow"``) raise a ``ValueError``.
    """
    given = {"num_inference_steps": num_inference_steps, "layout": layout,
             "scheduler": scheduler, "mlp_dim": mlp_dim, "num_blocks": num_blocks != 2 or None,
             "predict_read": predict_read}
    # num_inference_steps is accepted (and unused) by "l1", so one call can loop over heads
    unused = {"l1": ("layout", "scheduler"),
              "flow": ("scheduler", "mlp_dim", "num_blocks", "predict_read")}.get(head, ())
    ignored = [name for name in unused if given[name] is not None]
    if ignored:
        raise ValueError(f"oft_head({head!r}) takes no {', '.join(ignored)}")
    if head == "l1":
        return L1RegressionHead(hidden_size, action_dim, chunk_size, mlp_dim, num_blocks,
                                predict_read=predict_read)
    cached = attention != "bidirectional"
    if head == "diffusion":
        return DiffusionActionHead(
            hidden_size, action_dim, chunk_size, scheduler=scheduler,
            num_inference_steps=50 if num_inference_steps is None else num_inference_steps,
            mlp_dim=mlp_dim, num_blocks=num_blocks,
            layout=layout or ("cached" if cached else "oft"), predict_read=predict_read,
        )
    if head == "flow":
        return FlowMatchingHead(
            hidden_size, action_dim, chunk_size,
            num_steps=10 if num_inference_steps is None else num_inference_steps,
            layout=layout or ("cached" if cached else "full"),
        )
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def openvla_oft(
    *,
    encoder: nn.Module,
    projector: nn.Module,
    decoder: nn.Module,
    head: nn.Module,
    proprio_projector: nn.Module | None = None,
    attention: str = "bidirectional",
    action_normalizer: ActionNormalizer | None = None,
    proprio_normalizer: ActionNormalizer | None = None,
    num_views: int | None = None,
    bos_id: int = 1,
    eos_id: int = 2,
    pruner: nn.Module | None = None,
) -> VLA:
    """Component builder: an OpenVLA-OFT-style model from any encoder, projector, decoder and
    continuous head.

    Sequence: ``<s>``, image tokens of every view, [proprio], [diffusion timestep], prompt
    (ending in ``"▁"``, 29871 for Llama-2: the processor appends it), ``chunk * a`` action
    slots, ``</s>``; positions run contiguously. FiLM's language vector is OFT's (the mean of
    ``<s>``, the prompt columns and ``</s>``). ``pruner``: a token pruner
    ([vlakit.pruners][vlakit.pruners]; LightVLA's is [lightvla][vlakit.models.lightvla.lightvla]).
    """
    return VLA(
        encoder=encoder,
        projector=projector,
        interleaver=PrefixInterleaver(bos_id=bos_id, eos_id=eos_id),
        decoder=decoder,
        mask_policy=oft_mask(attention),
        head=head,
        proprio_projector=proprio_projector,
        action_normalizer=action_normalizer,
        proprio_normalizer=proprio_normalizer,
        num_views=num_views,
        language_vector=OFTLanguageVector(bos_id, eos_id) if encoder.has_film else None,
        pruner=pruner,
    )


def openvla_oft_7b(
    head: str = "l1",
    num_views: int | None = 2,
    proprio_dim: int | None = 8,
    chunk_size: int = 8,
    action_dim: int = 7,
    film: bool = False,
    attention: str = "bidirectional",
    *,
    num_inference_steps: int | None = None,
    layout: str | None = None,
    img_size: int = 224,
    vocab_size: int = 32064,
    norm_eps: float | None = None,
    action_normalizer: ActionNormalizer | None = None,
    proprio_normalizer: ActionNormalizer | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    linear: LinearFactory = nn.Linear,
    pruner: nn.Module | None = None,
    predict_read: str | None = None,
) -> VLA:
    """OpenVLA-OFT at full size: OpenVLA-7B's towers, projector and Llama-2 plus OFT's head,
    proprio projector and (optionally) FiLM.

    The LIBERO configuration (the defaults: 2 views, proprio 8, chunk 8, action 7, L1) has
    7,709,173,191 parameters = OpenVLA-7B 7,541,237,184 + L1 head 151,117,831 + proprio
    projector 16,818,176. Other platforms are other arguments:

    - ALOHA: ``openvla_oft_7b(num_views=3, proprio_dim=14, chunk_size=25, action_dim=14,
      film=True, action_normalizer=ActionNormalizer.from_stats(stats, key, mode="bounds"))``;
    - BRIDGE: ``openvla_oft_7b(num_views=1, proprio_dim=None, chunk_size=5, action_dim=7)``.

    Args:
        head: ``"l1"``, ``"diffusion"`` (+ the noisy-action projector, 16,789,504) or
            ``"flow"`` (see [oft_head][vlakit.models.oft_head]).
        num_views: camera views per example (checked on every batch; ``None``: any).
        proprio_dim: proprio width, or ``None`` for no proprio token.
        chunk_size: actions per prediction.
        action_dim: action dimensions.
        film: FiLM in every block of both towers, conditioned on the language vector.
        attention: ``"bidirectional"`` (OFT), ``"causal"`` or ``"parallel"`` (see
            [oft_mask][vlakit.models.oft_mask]).
        num_inference_steps: diffusion or flow steps at prediction.
        layout: the iterative head's layout (default from ``attention``).
        img_size: image size of both towers.
        vocab_size: Llama vocabulary incl. the pad token, padded to a multiple of 64.
        norm_eps: the Llama's RMSNorm epsilon (default 1e-6, as the release runs).
        action_normalizer: normalises targets, unnormalises predictions.
        proprio_normalizer: normalises proprio (OFT at evaluation:
            ``ActionNormalizer.from_stats(..., key="proprio", form="oft_eval")``).
        dtype: parameter dtype, built directly.
        device: where to build (``"meta"`` for counting).
        linear: factory for the towers' and the Llama's linear layers.
        pruner: a token pruner before the Llama (LightVLA:
            [lightvla_7b][vlakit.models.lightvla_7b]).
        predict_read: the L1/diffusion head's read at prediction (default: its training
            read, ``"previous"``; LightVLA's release reads ``"next"``, see
            [SLOT_READS][vlakit.heads.SLOT_READS]).
    """
    with building(dtype, device):
        encoder, projector, decoder = _openvla_7b_parts(
            img_size, vocab_size, norm_eps, -2, linear
        )
        if film:
            encoder.add_film(decoder.dim, linear=linear)
        return openvla_oft(
            encoder=encoder,
            projector=projector,
            decoder=decoder,
            head=oft_head(
                head, decoder.dim, chunk_size, action_dim, attention,
                num_inference_steps=num_inference_steps, layout=layout,
                predict_read=predict_read,
            ),
            proprio_projector=(
                None if proprio_dim is None else ProprioProjector(proprio_dim, decoder.dim)
            ),
            attention=attention,
            action_normalizer=action_normalizer,
            proprio_normalizer=proprio_normalizer,
            num_views=num_views,
            pruner=pruner,
        )


# -- the published run folder ----------------------------------------------------------------

def load_openvla_oft(
    path: str | os.PathLike,
    unnorm_key: str | None = None,
    *,
    chunk_size: int | None = None,
    num_views: int | None = None,
    attention: str = "bidirectional",
    step: str | None = None,
    pruner: nn.Module | None = None,
    predict_read: str | None = None,
    num_inference_steps: int | None = None,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_report: bool = False,
) -> VLA | tuple[VLA, LoadReport]:
    """An OpenVLA-OFT (or LightVLA) run directory as an
    [openvla_oft][vlakit.models.openvla_oft.openvla_oft] assembly with its weights.

    The directory is an OpenVLA directory (see [load_openvla][vlakit.models.load_openvla];
    FiLM weights inside the vision towers are found and loaded) plus OFT's component files
    ([read_oft_components][vlakit.convert.read_oft_components]): the action head (L1:
    ``model.*``; diffusion: ``noise_predictor.*``), the proprio projector and, for
    diffusion, the noisy-action projector. What the model is follows from them: the head
    kind, its action dimension, MLP width and depth from the head's shapes, the proprio
    width from the proprio projector's (no file: no proprio token), FiLM from the tower
    keys.

    Two things OFT keeps outside its files. The chunk size is a platform constant: taken,
    as OFT does, from the dataset name (``libero*``: 8, ``aloha*``: 25, ``bridge*``: 5), or
    given as ``chunk_size``; the same platform picks the action normalisation (ALOHA:
    min/max; else q01/q99), and proprio is normalised in OFT's evaluation form. The number
    of camera views (OFT's ``num_images_in_input``) is a training flag its run folders do
    not record: it is ``num_views``, else ``config.json``'s ``num_images_in_input`` when the
    config holds one, else a ``ValueError`` asks for it; the model then refuses a batch
    with another count.

    Args:
        path: the run directory.
        unnorm_key: the dataset whose statistics (un)normalise actions and proprio.
        chunk_size: actions per chunk, when the dataset name does not say.
        num_views: camera views per example (LIBERO runs: 2, ALOHA: 3), checked on every
            batch.
        attention: ``"bidirectional"`` (OFT), ``"causal"`` or ``"parallel"``.
        step: which ``--{step}_checkpoint.pt`` files to read, when there are several.
        pruner: a token pruner (LightVLA: [load_lightvla][vlakit.models.load_lightvla]).
        predict_read: the head's read at prediction (see
            [SLOT_READS][vlakit.heads.SLOT_READS]).
        num_inference_steps: diffusion steps at prediction (default 50).
        adapter: a peft LoRA adapter folder merged into the base weights (OFT fine-tunes
            the backbone with LoRA r=32; its run folders usually hold the merged weights).
        merge_adapter: ``False`` keeps the adapter as LoRA layers (see ``load_openvla``).
        dtype: parameter dtype (default float32).
        device: where the weights go (default CPU).
        return_report: also return the [LoadReport][vlakit.core.LoadReport].
    """
    source = _read_prismatic(Path(path), unnorm_key, adapter, merge_adapter)
    parts = read_oft_components(source.path, step)
    if "vision_backbone" in parts:  # FiLM runs keep their vision backbone apart
        source.files = _overlay_vision(source.files, parts.pop("vision_backbone"))
    platform = next((p for p in _PLATFORMS if source.dataset.lower().startswith(p[0])), None)
    mode = platform[2] if platform else "bounds_q99"
    normalizer, proprio_normalizer = source.normalizer(mode), None
    chunk = chunk_size or _platform_chunk(platform, source.dataset)
    proprio = parts.get("proprio_projector")
    if proprio is not None and source.norm_stats and "proprio" in source.norm_stats[
            source.dataset]:
        proprio_normalizer = source.normalizer(mode, key="proprio", form="oft_eval")
    head_state, extra = _oft_weights(parts)
    with building(None, "meta"):
        encoder, projector, decoder = _prismatic_blocks(source)
        model = openvla_oft(
            encoder=encoder, projector=projector, decoder=decoder,
            head=_oft_head(head_state, decoder.dim, chunk, attention, predict_read,
                           num_inference_steps, source.path),
            proprio_projector=None if proprio is None else ProprioProjector(
                proprio["fc1.weight"].shape[1], proprio["fc1.weight"].shape[0]),
            attention=attention, action_normalizer=normalizer,
            proprio_normalizer=proprio_normalizer, num_views=_views(num_views, source.raw),
            bos_id=source.llm_config.bos_token_id, eos_id=source.llm_config.eos_token_id,
            pruner=pruner,
        )
    report = _load_prismatic(model, source, extra, dtype=dtype, device=device)
    return (model, report) if return_report else model


def openvla_oft_policy(
    path: str | os.PathLike,
    unnorm_key: str | None = None,
    *,
    keys: ObservationKeys | None = None,
    tokenizer: Any = None,
    **load_options: Any,
) -> PolicyBundle:
    """An OpenVLA-OFT run directory as a [PolicyBundle][vlakit.bundle.PolicyBundle]: the
    model from [load_openvla_oft][vlakit.models.load_openvla_oft] (``num_views`` as there),
    the directory's tokenizer and an [OpenVLAProcessor][vlakit.processors.OpenVLAProcessor]
    that does what OFT's evaluation does (the instruction lower-cased, ``"▁"`` appended);
    the observation keys name as many cameras as the model reads and the state when it has
    a proprio projector.

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
    model = load_openvla_oft(path, unnorm_key, **load_options)
    return policy_bundle(model, path, OpenVLAProcessor, keys, tokenizer, lowercase=True)


_PLATFORMS = (("libero", 8, "bounds_q99"), ("aloha", 25, "bounds"), ("bridge", 5, "bounds_q99"))
"""OFT's platform constants by dataset-name prefix: (prefix, chunk size, normalisation)."""


def _platform_chunk(platform: tuple | None, dataset: str) -> int:
    if platform is None:
        raise ValueError(
            f"the chunk size of dataset {dataset!r} is not known (OFT keeps it as a "
            f"platform constant: libero 8, aloha 25, bridge 5): pass chunk_size="
        )
    return platform[1]


def _views(num_views: int | None, raw: dict) -> int | None:
    """The camera views the run reads: given, else the config's ``num_images_in_input``
    (OFT's training flag, which its released configs do not record), else an error: a
    model that took any count would run a wrong one without a word."""
    if num_views is not None:
        return num_views
    stored = raw.get("num_images_in_input")
    if stored is None:
        raise ValueError(
            "the run folder does not record how many camera views the model was trained on "
            "(OFT's --num_images_in_input; config.json has no num_images_in_input): pass "
            "num_views= (OFT's LIBERO runs: 2, third-person and wrist; ALOHA: 3; Bridge: 1)"
        )
    return int(stored)


def _overlay_vision(files: Mapping, vision: dict[str, Tensor]) -> CheckpointView:
    """The base checkpoint with its ``vision_backbone.*`` keys replaced by OFT's FiLM file."""
    names = {k: k for k in files if not k.startswith("vision_backbone.")}
    return CheckpointView(files, names=names, tensors=vision)


def _oft_weights(parts: dict[str, dict[str, Tensor]]) -> tuple[dict, dict[str, Tensor]]:
    """The head's state (its noisy-action projector inside, for diffusion) and every OFT
    component tensor under its vlakit key."""
    head_state = parts["action_head"]
    if "noisy_action_projector" in parts:
        head_state.update({f"noisy_action_projector.{k}": v
                           for k, v in parts["noisy_action_projector"].items()})
    extra = {f"head.{k}": v for k, v in head_state.items()}
    extra.update({f"proprio_projector.{k}": v
                  for k, v in parts.get("proprio_projector", {}).items()})
    return head_state, extra


def _oft_head(head_state: dict, hidden: int, chunk_size: int, attention: str,
              predict_read: str | None, num_inference_steps: int | None, path: Path) -> nn.Module:
    """The head the stored shapes describe: its kind (L1: ``model.*``; diffusion:
    ``noise_predictor.*``), action dimension, MLP width and depth."""
    if any(k.startswith("noise_predictor.") for k in head_state):
        kind, prefix = "diffusion", "noise_predictor.mlp_resnet."
    elif any(k.startswith("model.") for k in head_state):
        kind, prefix = "l1", "model."
    else:
        raise CheckpointError(
            f"the action head in {path} has neither L1 regression keys (model.*) nor "
            f"diffusion keys (noise_predictor.*): e.g. {sorted(head_state)[:3]}"
        )
    out = head_state[f"{prefix}fc2.weight"].shape[0]
    mlp_dim, width = head_state[f"{prefix}fc1.weight"].shape
    if width != out * hidden:
        raise CheckpointError(
            f"the action head reads {width} features, but {out} actions x the LLM's width "
            f"{hidden} is {out * hidden}: the head belongs to another model"
        )
    blocks = len({k.split(".")[len(prefix.split("."))]
                  for k in head_state if k.startswith(f"{prefix}mlp_resnet_blocks.")})
    extra = {} if kind == "l1" else {"num_inference_steps": num_inference_steps}
    return oft_head(kind, hidden, chunk_size, out, attention, mlp_dim=mlp_dim,
                    num_blocks=blocks, predict_read=predict_read, **extra)
