"""OpenVLA-7B: fused DINOv2 + SigLIP at the second-to-last block, MLP projector, Llama-2-7B,
actions as 256-bin tokens."""

import torch
from torch import nn

from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.core import CausalMask, LinearFactory, building
from vlakit.decoders import llama2_7b
from vlakit.heads import DiscreteActionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.model import VLA
from vlakit.projectors import MLPProjector
from vlakit.vision import FusedEncoder, dinov2_large_reg4, siglip_so400m

__all__ = ["openvla", "openvla_7b"]


def openvla(
    *,
    encoder: nn.Module,
    projector: nn.Module,
    decoder: nn.Module,
    action_tokenizer: ActionTokenizer,
    action_normalizer: ActionNormalizer | None = None,
    chunk_size: int = 1,
    bos_id: int = 1,
    eos_id: int = 2,
) -> VLA:
    """Component builder: an OpenVLA-style model from any encoder, projector and decoder.

    ``<s>``, image tokens, prompt, action tokens, ``</s>`` under a causal mask; actions are
    generated greedily as tokens ([`DiscreteActionHead`][vlakit.heads.DiscreteActionHead]).
    """
    return VLA(
        encoder=encoder,
        projector=projector,
        interleaver=PrefixInterleaver(bos_id=bos_id, eos_id=eos_id),
        decoder=decoder,
        mask_policy=CausalMask(),
        head=DiscreteActionHead(action_tokenizer, chunk_size=chunk_size),
        action_normalizer=action_normalizer,
    )


def openvla_7b(
    img_size: int = 224,
    vocab_size: int = 32064,
    norm_eps: float | None = None,
    encoder_output_layer: int = -2,
    action_dim: int = 7,
    action_vocab_end: int = 32000,
    action_normalizer: ActionNormalizer | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    linear: LinearFactory = nn.Linear,
) -> VLA:
    """OpenVLA-7B: 7,541,237,184 parameters, the same state-dict shapes as the release.

    Keeps every parameter of the released checkpoint, including the parts the forward never
    uses (the last block and final norm of both towers, SigLIP's pooling head); call
    ``model.encoder.encoders[i].truncate()`` to drop them after loading.

    Args:
        img_size: image size of both towers (224: 256 image tokens per view).
        vocab_size: Llama vocabulary incl. the pad token, padded to a multiple of 64.
        norm_eps: the Llama's RMSNorm epsilon; default 1e-6, what the released OpenVLA
            runs with (its saved config falls back to transformers' default, although
            Llama-2 was trained with 1e-5; the two move logits by ~2e-4).
        encoder_output_layer: block both towers return (second-to-last).
        action_dim: action dimensions per step.
        action_vocab_end: one past the last action-token id (the tokenizer's base vocab).
        action_normalizer: unnormalises predictions (``ActionNormalizer.from_stats(
            norm_stats, unnorm_key)``); ``None`` returns normalised actions in [-1, 1].
        dtype: parameter dtype, built directly (no fp32 copy first).
        device: where to build (``"meta"`` for counting).
        linear: factory for every linear layer of both towers and the Llama (LoRA,
            quantised, FP8 linears); the projector and the LM head stay ``nn.Linear``.
    """
    with building(dtype, device):
        encoder, projector, decoder = _openvla_7b_parts(
            img_size, vocab_size, norm_eps, encoder_output_layer, linear
        )
        return openvla(
            encoder=encoder,
            projector=projector,
            decoder=decoder,
            action_tokenizer=ActionTokenizer(vocab_end=action_vocab_end, action_dim=action_dim),
            action_normalizer=action_normalizer,
        )


def _openvla_7b_parts(
    img_size: int,
    vocab_size: int,
    norm_eps: float | None,
    encoder_output_layer: int,
    linear: LinearFactory,
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """OpenVLA-7B's fused towers, projector and Llama (inside ``building``)."""
    encoder = FusedEncoder([
        dinov2_large_reg4(img_size, output_layer=encoder_output_layer, linear=linear),
        siglip_so400m(img_size, map_head=True, gelu_approximate="none",
                      output_layer=encoder_output_layer, linear=linear),
    ])
    decoder = llama2_7b(vocab_size, 1e-6 if norm_eps is None else norm_eps, linear=linear)
    return encoder, MLPProjector([2176, 8704, 4096, 4096]), decoder
