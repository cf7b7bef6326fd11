"""PaliGemma: SigLIP So400m/14 + linear projector + Gemma-2B, prefix-LM over image + prompt.

The family file: the builders ([paligemma_3b][vlakit.models.paligemma_3b], the component
builder [paligemma][vlakit.models.paligemma.paligemma]), the converter from a transformers
model and the loader of a published directory
([load_paligemma][vlakit.models.load_paligemma]) with its weight map.
"""

import os
from pathlib import Path

import torch
from torch import nn

from vlakit.convert.rename import rename_keys
from vlakit.convert.transformers import (
    HF_DECODER_RULES,
    decoder_from_transformers,
    decoder_spec,
    siglip_vit_spec,
    transformers_siglip_to_vit,
    vit_from_transformers,
)
from vlakit.core import (
    CheckpointError,
    CheckpointFiles,
    CheckpointView,
    LinearFactory,
    LoadReport,
    PrefixLMMask,
    building,
    load_into,
)
from vlakit.decoders import gemma_2b, transformer_decoder
from vlakit.heads import NextTokenHead
from vlakit.interleave import PlaceholderInterleaver
from vlakit.model import VLA
from vlakit.models._common import read_config
from vlakit.projectors import LinearProjector
from vlakit.vision import siglip_so400m, vit

__all__ = ["paligemma", "paligemma_3b", "paligemma_from_transformers", "load_paligemma"]

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
    num_views: int | None = None,
) -> VLA:
    """Component builder: a PaliGemma-style model from any encoder, projector and decoder.

    Image features replace ``image_token_id`` placeholders
    ([`PlaceholderInterleaver`][vlakit.interleave.PlaceholderInterleaver]), positions start
    at 1 as in transformers, and the mask is prefix-LM
    ([`PrefixLMMask`][vlakit.core.PrefixLMMask]). The head defaults to
    [`NextTokenHead`][vlakit.heads.NextTokenHead] (the VLM's suffix-text loss); pass an
    action head to make a VLA. ``num_views``: camera views every batch must bring (PaliGemma
    reads one; ``None``: any count).
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
        num_views=num_views,
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


# -- the published directory -----------------------------------------------------------------

def load_paligemma(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_report: bool = False,
) -> VLA | tuple[VLA, LoadReport]:
    """A PaliGemma checkpoint directory (``config.json`` and ``model.safetensors`` or an
    index with shards, any of 224/448/896 px or a tiny one) as a vlakit
    [paligemma][vlakit.models.paligemma.paligemma] assembly, weights loaded strictly.

    Accepts the Hub layout (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
    ``language_model.model.*``, ``lm_head`` present or absent) and transformers 5.x's
    (``save_pretrained`` output and module names). Sizes, ids and the tied head come from
    ``config.json``. A stored ``lm_head.weight`` under a tied config must equal the
    embedding (else a ``CheckpointError``). PaliGemma reads one image: the model is built
    with ``num_views=1``, so a batch with more views is refused.

    Args:
        path: the directory.
        dtype: parameter dtype (default: the stored dtype of each tensor's model
            parameter, i.e. torch's default, float32); a bf16 checkpoint into float32 is
            converted and said in the report.
        device: where the weights go (default CPU).
        return_report: also return the [LoadReport][vlakit.core.LoadReport].
    """
    config = _paligemma_config(path)
    files = CheckpointFiles(path)
    with building(None, "meta"):
        model = _paligemma_on_meta(config)
    state, skipped = _paligemma_weights(files, model.decoder.tied_embeddings)
    with files:
        report = load_into(model, state, skipped=skipped, device=device, dtype=dtype,
                           source=f"PaliGemma checkpoint {Path(path)}")
    return (model, report) if return_report else model


def _paligemma_config(path: str | os.PathLike):
    """The directory's ``PaliGemmaConfig`` (through transformers), a Gemma (PaliGemma 1)."""
    from transformers import PaliGemmaConfig

    read_config(path, "paligemma", "PaliGemma")
    config = PaliGemmaConfig.from_pretrained(path)
    if config.text_config.model_type != "gemma":
        raise CheckpointError(
            f"this PaliGemma's language model is {config.text_config.model_type!r}; vlakit's "
            f"loader builds Gemma (PaliGemma 1) language models"
        )
    return config


def _paligemma_on_meta(config) -> VLA:
    """The assembly the config describes (inside ``building(None, "meta")``), one view."""
    text, vision = config.text_config, config.vision_config
    return paligemma(
        encoder=vit(**siglip_vit_spec(vision)),
        projector=LinearProjector(vision.hidden_size, vision.projection_dim, bias=True),
        decoder=transformer_decoder(**decoder_spec(text, "gemma", has_lm_head=True)),
        image_token_id=config.image_token_id, bos_id=text.bos_token_id,
        eos_id=text.eos_token_id, num_views=1,
    )


def _split_paligemma_keys(keys) -> dict[str, dict[str, str]]:
    """Source keys by part (vision / projector / decoder / lm_head), part-relative, for the
    Hub layout (``vision_tower.vision_model.*``, ``language_model.model.*``), transformers
    5's saved layout (``vision_tower.*``) and its module names (``model.vision_tower.*``,
    ``model.language_model.*``, ``lm_head.weight``)."""
    parts: dict[str, dict[str, str]] = {"vision": {}, "projector": {}, "decoder": {},
                                         "lm_head": {}}
    for key in keys:
        k = key[len("model."):] if key.startswith("model.") else key
        if k.startswith("vision_tower."):
            inner = k[len("vision_tower."):]
            parts["vision"][inner.removeprefix("vision_model.")] = key
        elif k.startswith("multi_modal_projector."):
            parts["projector"][k[len("multi_modal_projector."):]] = key
        elif k in ("lm_head.weight", "language_model.lm_head.weight"):
            parts["lm_head"]["weight"] = key
        elif k.startswith("language_model."):
            parts["decoder"][k[len("language_model."):]] = key
        else:
            raise CheckpointError(
                f"PaliGemma checkpoint key {key!r} belongs to no part of the model (vision "
                f"tower, projector, language model): not a PaliGemma checkpoint?"
            )
    return parts


def _paligemma_weights(files: CheckpointFiles, tied: bool) -> tuple[CheckpointView, list[str]]:
    """The weight map: vlakit key -> stored tensor (the SigLIP q, k, v read and fused now,
    the rest read as it loads), and the stored keys accepted unloaded (a tied head)."""
    parts = _split_paligemma_keys(files)
    vision_weights = {k: files[src] for k, src in parts["vision"].items()}  # q, k, v fused
    tensors = {f"encoder.{key}": tensor
               for key, tensor in transformers_siglip_to_vit(vision_weights).items()}
    del vision_weights  # the separate q, k, v: not kept beside the fused copies
    names = {f"projector.{key}": src for key, src in parts["projector"].items()}
    decoder = rename_keys(parts["decoder"], HF_DECODER_RULES, source="PaliGemma language model")
    names.update({f"decoder.{key}": src for key, src in decoder.items()})
    skipped = []
    head = parts["lm_head"].get("weight")
    if head is not None:
        if tied:
            embed = decoder.get("embed.weight")
            if embed is None or not torch.equal(files[head], files[embed]):
                raise CheckpointError(
                    f"{head!r} differs from the embedding, but config.json ties them "
                    f"(tie_word_embeddings); the checkpoint and its config disagree"
                )
            skipped.append(head)
        else:
            names["decoder.lm_head.weight"] = head
    return CheckpointView(files, names=names, tensors=tensors), skipped
