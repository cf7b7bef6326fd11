"""Loading published checkpoint directories into vlakit assemblies in one call.

The architecture comes from the directory's ``config.json`` (no table of sizes kept by
hand), the model is built on the ``meta`` device, and the weights are assigned from the
memory-mapped safetensors ([load_into][vlakit.convert.load_into]): nothing is
initialised and nothing is held twice.
"""

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from vlakit.convert import (
    HF_DECODER_RULES,
    CheckpointFiles,
    LoadReport,
    decoder_spec,
    load_into,
    rename_keys,
    siglip_vit_spec,
    transformers_siglip_to_vit,
)
from vlakit.core import CheckpointError, building
from vlakit.decoders import transformer_decoder
from vlakit.model import VLA
from vlakit.models.paligemma import paligemma
from vlakit.projectors import LinearProjector
from vlakit.vision import vit

__all__ = ["load_paligemma", "read_config"]


def read_config(path: str | os.PathLike) -> dict:
    """A checkpoint directory's ``config.json`` as a dict (a clear error if absent or bad)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{Path(path)} has no config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None


class _Renamed(Mapping):
    """vlakit key -> tensor, each read on access from the source mapping (or given)."""

    def __init__(self) -> None:
        self.sources: dict[str, tuple[Mapping, str]] = {}
        self.tensors: dict[str, Tensor] = {}

    def add(self, key: str, source: Mapping, source_key: str) -> None:
        self.sources[key] = (source, source_key)

    def __getitem__(self, key: str) -> Tensor:
        if key in self.tensors:
            return self.tensors[key]
        source, source_key = self.sources[key]
        return source[source_key]

    def __iter__(self) -> Iterator[str]:
        yield from self.tensors
        yield from self.sources

    def __len__(self) -> int:
        return len(self.tensors) + len(self.sources)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.tensors:
            return tuple(self.tensors[key].shape)
        source, source_key = self.sources[key]
        return source.shape(source_key)

    def dtype(self, key: str) -> torch.dtype:
        if key in self.tensors:
            return self.tensors[key].dtype
        source, source_key = self.sources[key]
        return source.dtype(source_key)


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
    embedding (else a ``CheckpointError``).

    Args:
        path: the directory.
        dtype: parameter dtype (default: the stored dtype of each tensor's model
            parameter, i.e. torch's default, float32); a bf16 checkpoint into float32 is
            converted and said in the report.
        device: where the weights go (default CPU).
        return_report: also return the [LoadReport][vlakit.convert.LoadReport].
    """
    from transformers import PaliGemmaConfig

    raw = read_config(path)
    if raw.get("model_type") != "paligemma":
        raise CheckpointError(
            f"{Path(path) / 'config.json'} describes a {raw.get('model_type')!r} model, not "
            f"PaliGemma (model_type 'paligemma')"
        )
    config = PaliGemmaConfig.from_pretrained(path)
    text, vision = config.text_config, config.vision_config
    if text.model_type != "gemma":
        raise CheckpointError(
            f"this PaliGemma's language model is {text.model_type!r}; vlakit's loader builds "
            f"Gemma (PaliGemma 1) language models"
        )
    files = CheckpointFiles(path)
    parts = _split_paligemma_keys(files)
    with building(None, "meta"):
        encoder = vit(**siglip_vit_spec(vision))
        projector = LinearProjector(vision.hidden_size, vision.projection_dim, bias=True)
        decoder = transformer_decoder(**decoder_spec(text, "gemma", has_lm_head=True))
        model = paligemma(
            encoder=encoder, projector=projector, decoder=decoder,
            image_token_id=config.image_token_id, bos_id=text.bos_token_id,
            eos_id=text.eos_token_id,
        )
    state, skipped = _Renamed(), []
    vision_weights = {k: files[src] for k, src in parts["vision"].items()}  # q, k, v fused
    for key, tensor in transformers_siglip_to_vit(vision_weights).items():
        state.tensors[f"encoder.{key}"] = tensor
    for key, src in parts["projector"].items():
        state.add(f"projector.{key}", files, src)
    names = rename_keys(parts["decoder"], HF_DECODER_RULES, source="PaliGemma language model")
    for key, src in names.items():
        state.add(f"decoder.{key}", files, src)
    head = parts["lm_head"].get("weight")
    if head is not None:
        if decoder.tied_embeddings:
            embed = names.get("embed.weight")
            if embed is None or not torch.equal(files[head], files[embed]):
                raise CheckpointError(
                    f"{head!r} differs from the embedding, but config.json ties them "
                    f"(tie_word_embeddings); the checkpoint and its config disagree"
                )
            skipped.append(head)
        else:
            state.add("decoder.lm_head.weight", files, head)
    with files:
        report = load_into(model, state, shape_of=state.shape, dtype_of=state.dtype,
                           skipped=skipped, device=device, dtype=dtype,
                           source=f"PaliGemma checkpoint {Path(path)}")
    return (model, report) if return_report else model
