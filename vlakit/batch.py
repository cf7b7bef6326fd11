"""The model's batch and output types: what a processor builds and what ``VLA.forward``
returns."""

import dataclasses

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlakit.core import TokenSequence

__all__ = ["VLAInputs", "VLAOutput", "check_batch"]


@dataclasses.dataclass
class VLAInputs:
    """One model batch, as a processor builds it.

    Attributes:
        input_ids: ``[b, t]`` prompt ids (right-padded). OpenVLA family: without ``<s>``
            (the interleaver adds it). PaliGemma family: with the image placeholders.
        text_valid: ``[b, t]`` ``True`` for real prompt tokens.
        pixels: ``[b, v, c, h, w]`` (or ``[b, c, h, w]``) preprocessed images.
        token_type_ids: ``[b, t]`` 0 prefix / 1 suffix (PaliGemma), optional.
        actions: ``[b, chunk, a]`` raw (unnormalised) target actions, for training.
        proprio: ``[b, p]`` raw proprioceptive state, optional.
        action_is_pad: ``[b, chunk]`` ``True`` where a target step is padding (the chunk
            ran past its episode's end; LeRobot's ``action_is_pad``): every action head's
            loss leaves those steps out. ``None``: every step is real.
        view_valid: ``[b, v]`` ``False`` where a declared camera is absent from that
            example: its image tokens are masked out of the sequence (attended by nothing,
            taking no position; LeRobot's and openpi's image masks), whatever its pixels
            hold. ``None``: every view is present.
        actions_normalized: ``True`` when ``actions`` are already in the model's normalised
            space (``[-1, 1]``, e.g. a dataset that stores normalised actions): the model
            then does not normalise them again (values outside ``[-1, 1]`` raise). Default
            ``False``: raw actions in the robot's units, normalised by the model's
            ``action_normalizer``.
    """

    input_ids: Int[Tensor, "b t"]
    text_valid: Bool[Tensor, "b t"]
    pixels: Float[Tensor, "b v c h w"] | Float[Tensor, "b c h w"] | None = None
    token_type_ids: Int[Tensor, "b t"] | None = None
    actions: Float[Tensor, "b chunk a"] | None = None
    proprio: Float[Tensor, "b p"] | None = None
    action_is_pad: Bool[Tensor, "b chunk"] | None = None
    view_valid: Bool[Tensor, "b v"] | None = None
    actions_normalized: bool = False

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "VLAInputs":
        """Move every tensor to ``device``; ``dtype`` casts the pixels only. Target actions
        and proprio stay as they are (rounding them to bf16 before normalisation would move
        action tokens); the model casts what it feeds its modules to their dtype itself."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device=device, dtype=dtype if f.name == "pixels" else None)
            moved[f.name] = value
        return VLAInputs(**moved)


    def rows(self, index: slice | Tensor | list[int]) -> "VLAInputs":
        """The examples ``index`` selects (a slice, a list of row numbers or a boolean /
        integer tensor), every per-example field cut alike."""
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if isinstance(value, Tensor) else value
        return VLAInputs(**picked)


def check_batch(inputs: VLAInputs) -> None:
    """Shape-only check (no host sync) that the fields of ``inputs`` share one batch size."""
    ids = inputs.input_ids
    if ids.dim() != 2:
        raise ValueError(
            f"inputs.input_ids must be [batch, tokens], got shape {tuple(ids.shape)}"
        )
    if inputs.text_valid.dtype != torch.bool:
        raise ValueError(
            f"inputs.text_valid must be a boolean mask (True = real prompt token), got dtype "
            f"{inputs.text_valid.dtype}; from a transformers tokenizer pass "
            f"attention_mask.bool()"
        )
    for name in ("text_valid", "token_type_ids"):
        value = getattr(inputs, name)
        if value is not None and tuple(value.shape) != tuple(ids.shape):
            raise ValueError(
                f"inputs.{name} has shape {tuple(value.shape)}, but inputs.input_ids has "
                f"shape {tuple(ids.shape)}; they must match"
            )
    pad = inputs.action_is_pad
    if pad is not None:
        if pad.dtype != torch.bool:
            raise ValueError(
                f"inputs.action_is_pad must be a boolean mask (True = padded step), got dtype "
                f"{pad.dtype}"
            )
        if inputs.actions is None:
            raise ValueError("inputs.action_is_pad was given without inputs.actions: the pad "
                             "mask marks steps of the target actions")
        if pad.dim() != 2 or tuple(pad.shape) != tuple(inputs.actions.shape[:2]):
            raise ValueError(
                f"inputs.action_is_pad has shape {tuple(pad.shape)}, expected [batch, chunk] = "
                f"{tuple(inputs.actions.shape[:2])} (the first two dimensions of inputs.actions)"
            )
    views = inputs.view_valid
    if views is not None:
        if views.dtype != torch.bool:
            raise ValueError(
                f"inputs.view_valid must be a boolean [batch, views] mask (True = camera "
                f"present), got dtype {views.dtype}"
            )
        pixels = inputs.pixels
        count = None if pixels is None else (pixels.shape[1] if pixels.dim() == 5 else 1)
        if views.dim() != 2 or views.shape[0] != ids.shape[0] or (
                count is not None and views.shape[1] != count):
            raise ValueError(
                f"inputs.view_valid has shape {tuple(views.shape)}, expected [batch, views] = "
                f"({ids.shape[0]}, {count}) (one flag per camera view of inputs.pixels)"
            )
    for name in ("pixels", "actions", "proprio"):
        value = getattr(inputs, name)
        if value is not None and (value.dim() == 0 or value.shape[0] != ids.shape[0]):
            raise ValueError(
                f"inputs.{name} has shape {tuple(value.shape)}, but inputs.input_ids has "
                f"{ids.shape[0]} rows; every field of VLAInputs needs the same batch size "
                f"(first dimension)"
            )


@dataclasses.dataclass
class VLAOutput:
    """What [`VLA.forward`][vlakit.VLA.forward] returns.

    Attributes:
        loss: scalar training loss when the inputs carry the head's targets (actions for an
            action head, a suffix for [NextTokenHead][vlakit.heads.NextTokenHead]), else
            ``None``.
        hidden: ``[b, n, d]`` final hidden states.
        sequence: the [`TokenSequence`][vlakit.core.TokenSequence] the decoder ran on.
        logits: ``[b, n, V]`` when asked for (``return_logits=True``), else ``None``.
    """

    loss: Tensor | None
    hidden: Tensor
    sequence: TokenSequence
    logits: Tensor | None = None
