"""PaliGemma: SigLIP So400m/14 + linear projector + Gemma-2B, prefix-LM over image + prompt."""

import torch
from torch import nn

from vlakit.convert.decoders import decoder_from_transformers
from vlakit.convert.vision import vit_from_transformers
from vlakit.core import LinearFactory, PrefixLMMask, building
from vlakit.decoders import gemma_2b
from vlakit.heads import NextTokenHead
from vlakit.interleave import PlaceholderInterleaver
from vlakit.model import VLA
from vlakit.projectors import LinearProjector
from vlakit.vision import siglip_so400m

__all__ = ["paligemma", "paligemma_3b", "paligemma_from_transformers"]

PALIGEMMA_IMAGE_TOKEN_ID = 257152


def paligemma(
    *,
    encoder: nn.Module,
    projector: nn.Module,
    decoder: nn.Module,
    image_token_id: int = PALIGEMMA_IMAGE_TOKEN_ID,
    bos_id: int = 2,
    eos_id: int = 1,
    head: nn.Module | None = None,
) -> VLA:
    """Component builder: a PaliGemma-style model from any encoder, projector and decoder.

    Image features replace ``image_token_id`` placeholders
    ([`PlaceholderInterleaver`][vlakit.interleave.PlaceholderInterleaver]), positions start
    at 1 as in transformers, and the mask is prefix-LM
    ([`PrefixLMMask`][vlakit.core.PrefixLMMask]). The head defaults to
    [`NextTokenHead`][vlakit.heads.NextTokenHead] (the VLM's suffix-text loss); pass an
    action head to make a VLA.
    """
    return VLA(
        encoder=encoder,
        projector=projector,
        interleaver=PlaceholderInterleaver(
            image_token_id, bos_id=bos_id, eos_id=eos_id, position_offset=1
        ),
        decoder=decoder,
        mask_policy=PrefixLMMask(),
        head=NextTokenHead() if head is None else head,
    )


def paligemma_3b(
    img_size: int = 224,
    vocab_size: int = 257216,
    image_token_id: int = PALIGEMMA_IMAGE_TOKEN_ID,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    linear: LinearFactory = nn.Linear,
) -> VLA:
    """PaliGemma-3B (pt-224): 2,923,466,480 parameters with the Hub vocabulary 257216.

    SigLIP So400m/14 without pooling head (tanh GELU), ``Linear(1152, 2048)`` with bias,
    Gemma-2B with a tied head. openpi / lerobot's pi0 use ``vocab_size=257152``
    (2,923,335,408).

    Args:
        img_size: 224 (256 image tokens), 448 or 896.
        vocab_size: the LM vocabulary.
        image_token_id: the placeholder id.
        dtype: parameter dtype (default: torch's default), built directly (no fp32 copy).
        device: where to build (``"meta"`` to count parameters without memory).
        linear: factory for every linear layer of the tower and the Gemma (LoRA,
            quantised, FP8 linears); the projector and the tied LM head are unaffected.
    """
    with building(dtype, device):
        return paligemma(
            encoder=siglip_so400m(img_size, linear=linear),
            projector=LinearProjector(1152, 2048, bias=True),
            decoder=gemma_2b(vocab_size=vocab_size, linear=linear),
            image_token_id=image_token_id,
        )


def paligemma_from_transformers(model: nn.Module) -> VLA:
    """Convert a transformers ``PaliGemmaForConditionalGeneration`` (any size) into the
    vlakit assembly, copying every weight. Logits and greedy generation match transformers
    (tested at tiny size in fp32)."""
    from transformers import PaliGemmaForConditionalGeneration

    if not isinstance(model, PaliGemmaForConditionalGeneration):
        raise TypeError(
            f"paligemma_from_transformers expects a transformers "
            f"PaliGemmaForConditionalGeneration, got {type(model).__name__}"
        )
    inner = model.model
    linear = inner.multi_modal_projector.linear
    projector = LinearProjector(linear.in_features, linear.out_features, bias=True)
    projector.linear.load_state_dict(linear.state_dict())
    text_config = model.config.text_config
    decoder = decoder_from_transformers(inner.language_model)
    if not text_config.tie_word_embeddings:
        raise ValueError(
            "this PaliGemma has an untied lm_head (text_config.tie_word_embeddings=False); "
            "the converter supports only checkpoints whose output head shares the input "
            "embedding weights"
        )
    weight = next(model.parameters())
    return paligemma(
        encoder=vit_from_transformers(inner.vision_tower),
        projector=projector.to(weight.device, weight.dtype),
        decoder=decoder,
        image_token_id=model.config.image_token_id,
        bos_id=text_config.bos_token_id,
        eos_id=text_config.eos_token_id,
    )
