"""Several encoders over the same image, features concatenated along the width."""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.core.recording import recorded
from vlakit.vision.base import VisionEncoder, as_hw, check_condition
from vlakit.vision.preprocess import PreprocessConfig

__all__ = ["FusedEncoder"]


@recorded
class FusedEncoder(VisionEncoder):
    """Concatenate the patch tokens of several encoders: ``d = Σ d_i`` (OpenVLA: DINOv2
    1024 + SigLIP 1152 = 2176 at 256 tokens).

    Pixel contract (OpenVLA's ``pixel_values``):
    [`preprocess`][vlakit.vision.FusedEncoder.preprocess] normalises the image once per
    encoder, each its own way, and concatenates the results along the **channel** axis
    (channels ``0:3`` for the first encoder, ``3:6`` for the second, ...);
    [`forward`][vlakit.vision.FusedEncoder.forward] splits the channels among the encoders.
    All encoders must produce the same number of patches at the shared image size.

    ``preprocessing`` is the combined config (size, all means and stds, the first encoder's
    interpolation); [`preprocess`][vlakit.vision.FusedEncoder.preprocess] itself resizes per
    encoder, so encoders with different interpolations are each served their own.

    FiLM: ``has_film`` is true when any member has FiLM layers; the condition is then
    required and passed to those members (OpenVLA-OFT: all of them), the others get none.

    Args:
        encoders: the encoders, in channel order.
    """

    def __init__(self, encoders: Sequence[VisionEncoder]) -> None:
        super().__init__()
        if len(encoders) == 0:
            raise ValueError("FusedEncoder needs at least one encoder, got an empty list")
        self.encoders = nn.ModuleList(encoders)
        sizes = [e.preprocessing.size for e in encoders]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"fused encoders must share the image size, got sizes {sizes} (one per encoder)"
            )
        counts = [e.num_patches(sizes[0]) for e in encoders]
        if len(set(counts)) > 1:
            raise ValueError(
                f"fused encoders must give the same number of patches, got {counts} patches "
                f"(one count per encoder) at image size {sizes[0]}"
            )
        self.dim = sum(e.dim for e in encoders)
        self.in_chans = sum(e.in_chans for e in encoders)
        self.preprocessing = PreprocessConfig(
            size=sizes[0],
            mean=tuple(m for e in encoders for m in e.preprocessing.mean),
            std=tuple(s for e in encoders for s in e.preprocessing.std),
            interpolation=encoders[0].preprocessing.interpolation,
        )

    @property
    def has_film(self) -> bool:
        return any(e.has_film for e in self.encoders)

    def add_film(
        self, cond_dim: int, zero_init: bool = False, linear: LinearFactory = nn.Linear
    ) -> "FusedEncoder":
        for encoder in self.encoders:
            encoder.add_film(cond_dim, zero_init=zero_init, linear=linear)
        return self

    def num_patches(self, image_size: int | Sequence[int] | None = None) -> int:
        size = as_hw(image_size) if image_size is not None else self.preprocessing.size
        counts = [e.num_patches(size) for e in self.encoders]
        if len(set(counts)) > 1:
            raise ValueError(
                f"fused encoders must give the same number of patches, but give {counts} "
                f"(one count per encoder) at image size {size}"
            )
        return counts[0]

    def check_image_size(self, height: int, width: int) -> None:
        for encoder in self.encoders:
            encoder.check_image_size(height, width)

    def preprocess(self, images: Any) -> Float[Tensor, "b c h w"] | Float[Tensor, "b v c h w"]:
        """Each encoder's preprocessing, concatenated along the channel axis."""
        parts = [e.preprocess(images) for e in self.encoders]
        return torch.cat(parts, dim=-3)

    def forward_features(
        self, pixels: Float[Tensor, "b c h w"], condition: Float[Tensor, "b k"] | None = None
    ) -> Float[Tensor, "b p d"]:
        check_condition("FusedEncoder", self.has_film, condition)
        chunks = torch.split(pixels, [e.in_chans for e in self.encoders], dim=1)
        feats = [
            e.forward_features(x, condition if e.has_film else None)
            for e, x in zip(self.encoders, chunks)
        ]
        return torch.cat(feats, dim=-1)
