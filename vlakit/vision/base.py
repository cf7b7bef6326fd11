"""The encoder contract shared by every vision encoder.

:class:`VisionEncoder` owns everything that is the same for all encoders: camera views,
input checks, the FiLM condition, preprocessing. A subclass implements
:meth:`~VisionEncoder.forward_features` on one image per batch row
(``[B, c, h, w] -> [B, p, d]``) and declares its width, patch count and preprocessing.
"""

import abc
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.vision.preprocess import PreprocessConfig, preprocess_images

__all__ = ["VisionEncoder", "stack_views", "as_hw"]


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``224 -> (224, 224)``; ``(h, w)`` unchanged."""
    if isinstance(size, int):
        return (size, size)
    hw = tuple(int(s) for s in size)
    if len(hw) != 2:
        raise ValueError(f"image size must be an int or (height, width), got {size!r}")
    return hw


def stack_views(views: Sequence[Tensor]) -> Float[Tensor, "b v c h w"]:
    """Stack per-example view tensors ``[v, c, h, w]`` into ``[b, v, c, h, w]``.

    Every example must have the same number of views (and the same image shape); the error
    names the counts otherwise. A ``[c, h, w]`` element counts as one view.
    """
    if len(views) == 0:
        raise ValueError("stack_views got an empty list")
    items = [v[None] if v.dim() == 3 else v for v in views]
    for i, item in enumerate(items):
        if item.dim() != 4:
            raise ValueError(
                f"example {i} must be [views, c, h, w] or [c, h, w], got shape "
                f"{tuple(views[i].shape)}"
            )
    counts = [item.shape[0] for item in items]
    if len(set(counts)) > 1:
        odd = next(i for i, n in enumerate(counts) if n != counts[0])
        raise ValueError(
            f"all examples must have the same number of views; got view counts {counts} "
            f"(example {odd} has {counts[odd]}, expected {counts[0]} like example 0)"
        )
    shapes = [tuple(item.shape[1:]) for item in items]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"example {i} has views of shape {shape}, expected {shapes[0]} like example 0"
            )
    return torch.stack(items, dim=0)


class VisionEncoder(nn.Module, abc.ABC):
    """Pixels → patch tokens, for one or several camera views.

    Subclasses set ``dim`` (token width), ``in_chans`` (channels of the *preprocessed*
    pixels), ``preprocessing`` (a :class:`PreprocessConfig`) and implement
    :meth:`forward_features`, :meth:`num_patches` and :meth:`check_image_size`.

    ``forward`` takes already preprocessed pixels (see :meth:`preprocess`):

    - ``[b, c, h, w]``: one view, returns ``[b, p, d]``;
    - ``[b, v, c, h, w]``: ``v`` views, folded into the batch, encoded, unfolded to
      ``[b, v·p, d]`` (view-major: the ``p`` tokens of view 0, then of view 1, ...);
    - a list of per-example ``[v, c, h, w]`` tensors, stacked with :func:`stack_views`.

    ``condition [b, k]`` is the FiLM conditioning vector (OpenVLA-OFT: the mean of the
    prompt's language embeddings); it is repeated per view. It is only accepted by an
    encoder with FiLM layers (see :func:`vlakit.vision.add_film`), which in turn requires it.
    """

    dim: int
    in_chans: int
    preprocessing: PreprocessConfig

    @abc.abstractmethod
    def forward_features(
        self, pixels: Float[Tensor, "b c h w"], condition: Float[Tensor, "b k"] | None = None
    ) -> Float[Tensor, "b p d"]:
        """Encode one image per row: ``[B, c, h, w] -> [B, p, d]`` (prefix tokens dropped)."""

    @abc.abstractmethod
    def num_patches(self, image_size: int | Sequence[int] | None = None) -> int:
        """Patch tokens per image at ``image_size`` (default: the preprocessing size)."""

    @abc.abstractmethod
    def check_image_size(self, height: int, width: int) -> None:
        """Raise a ``ValueError`` naming expected and actual sizes if ``(height, width)``
        cannot be encoded."""

    @property
    def patches_per_image(self) -> int:
        """Patch tokens per image at the preprocessing size."""
        return self.num_patches(self.preprocessing.size)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` the encoder expects (the preprocessing size)."""
        return self.preprocessing.size

    @property
    def has_film(self) -> bool:
        """Whether FiLM layers are attached (then ``condition`` is required)."""
        return False

    def add_film(self, cond_dim: int, zero_init: bool = False) -> "VisionEncoder":
        """Attach a FiLM layer to every block (see :func:`vlakit.vision.add_film`)."""
        raise TypeError(f"{type(self).__name__} does not support FiLM")

    def preprocess(self, images: Any) -> Float[Tensor, "b c h w"] | Float[Tensor, "b v c h w"]:
        """Resize and normalise raw images the way this encoder wants them.

        Tensor input: float in ``[0, 1]`` or ``uint8``, ``[b, 3, H, W]`` or
        ``[b, v, 3, H, W]``. PIL images / numpy arrays / lists of them are accepted too.
        """
        return preprocess_images(images, self.preprocessing)

    def forward(
        self,
        pixels: Float[Tensor, "b c h w"] | Float[Tensor, "b v c h w"] | Sequence[Tensor],
        condition: Float[Tensor, "b k"] | None = None,
    ) -> Float[Tensor, "b n d"]:
        """Preprocessed pixels → tokens ``[b, v·p, d]`` (``v = 1`` for 4-dim input).

        Args:
            pixels: ``[b, c, h, w]``, ``[b, v, c, h, w]``, or a list of ``[v, c, h, w]``.
            condition: ``[b, k]`` FiLM conditioning vector (only with FiLM attached).
        """
        if isinstance(pixels, (list, tuple)):
            pixels = stack_views(pixels)
        if not isinstance(pixels, Tensor):
            raise TypeError(f"pixels must be a tensor or a list of tensors, got {type(pixels)}")
        if pixels.dim() not in (4, 5):
            raise ValueError(
                f"pixels must be [b, c, h, w] or [b, v, c, h, w], got {pixels.dim()} dims "
                f"{tuple(pixels.shape)}"
            )
        views = pixels.shape[1] if pixels.dim() == 5 else 1
        c, h, w = pixels.shape[-3:]
        if c != self.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_chans} input channels, got {c} "
                f"(pixels shape {tuple(pixels.shape)})"
            )
        self.check_image_size(h, w)
        if condition is not None and condition.shape[0] != pixels.shape[0]:
            raise ValueError(
                f"condition batch is {condition.shape[0]}, pixels batch is {pixels.shape[0]}"
            )
        if pixels.dim() == 4:
            return self.forward_features(pixels, condition)
        flat = rearrange(pixels, "b v c h w -> (b v) c h w")
        if condition is not None:
            condition = repeat(condition, "b k -> (b v) k", v=views)
        tokens = self.forward_features(flat, condition)
        return rearrange(tokens, "(b v) p d -> b (v p) d", v=views)
