"""OpenVLA-OFT: OpenVLA's towers and Llama, a whole action chunk decoded in one pass by a
continuous head, optional proprio token, wrist views and FiLM."""

import torch
from torch import nn

from vlakit.actions import ActionNormalizer
from vlakit.core import (
    BidirectionalMask,
    CausalMask,
    LinearFactory,
    MaskPolicy,
    ParallelDecodingMask,
    building,
)
from vlakit.heads import DiffusionActionHead, FlowMatchingHead, L1RegressionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.language import OFTLanguageVector
from vlakit.model import VLA
from vlakit.models.openvla import _openvla_7b_parts
from vlakit.projectors import ProprioProjector

__all__ = ["openvla_oft", "openvla_oft_7b", "oft_head", "oft_mask"]

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
