"""The encoder contract shared by every vision encoder.

[`VisionEncoder`][vlakit.vision.VisionEncoder] owns everything that is the same for all
encoders: camera views, input checks, the FiLM condition, preprocessing. A subclass implements
[`forward_features`][vlakit.vision.VisionEncoder.forward_features] on one image per batch row
(``[B, c, h, w] -> [B, p, d]``) and declares its width, patch count and preprocessing.
"""

import abc
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.vision.preprocess import PreprocessConfig, preprocess_images

__all__ = ["VisionEncoder", "stack_views", "as_hw", "check_image_size", "layer_index"]


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``224 -> (224, 224)``; ``(h, w)`` unchanged."""
    if isinstance(size, int):
        return (size, size)
    hw = tuple(int(s) for s in size)
    if len(hw) != 2:
        raise ValueError(
            f"an image size must be an int or a (height, width) pair, got {size!r} "
            f"({len(hw)} values)"
        )
    return hw


def layer_index(layer: int, depth: int) -> int:
    """``output_layer`` (negative counts from the end) → block index in ``[0, depth)``."""
    if not -depth <= layer < depth:
        raise ValueError(
            f"output_layer must be a block index from {-depth} to {depth - 1} (the encoder has "
            f"{depth} blocks; -1 is the last), got {layer}"
        )
    return layer % depth


def check_image_size(
    height: int,
    width: int,
    patch: tuple[int, int],
    expected: tuple[int, int],
    dynamic: bool,
    hint: str = "enable a dynamic image size / position interpolation to change it",
) -> None:
    """Raise a ``ValueError`` that names the size the encoder expects and the size found.

    Args:
        height, width: the image size found.
        patch: ``(patch height, patch width)``.
        expected: the size the position embedding was built for.
        dynamic: other sizes (multiples of the patch) are accepted.
        hint: how to accept other sizes (appended to the fixed-size message).
    """
    if height % patch[0] or width % patch[1]:
        accepted = (
            f"a multiple of the patch size {patch[0]}x{patch[1]} on both sides"
            if dynamic
            else f"exactly {expected[0]}x{expected[1]} (height x width)"
        )
        raise ValueError(
            f"image size {height}x{width} (height x width) is not divisible by the patch size "
            f"{patch[0]}x{patch[1]}; this encoder expects {accepted}"
        )
    if not dynamic and (height, width) != tuple(expected):
        raise ValueError(
            f"expected image size {expected[0]}x{expected[1]} (height x width; the position "
            f"embedding covers {expected[0] // patch[0]}x{expected[1] // patch[1]} patches), "
            f"got {height}x{width}; {hint}"
        )


def check_condition(owner: str, has_film: bool, condition: Tensor | None) -> None:
    """FiLM encoders need a condition; the others must not be given one."""
    if has_film and condition is None:
        raise ValueError(
            f"{owner} has FiLM layers and needs a condition [batch, cond_dim] (OpenVLA-OFT: "
            "the mean of the prompt's embeddings), got condition=None"
        )
    if not has_film and condition is not None:
        raise ValueError(
            f"{owner} has no FiLM layers, so it takes no condition, but got a condition of "
            f"shape {tuple(condition.shape)}; attach FiLM with add_film(encoder, cond_dim) or "
            "pass condition=None"
        )


def stack_views(views: Sequence[Tensor]) -> Float[Tensor, "b v c h w"]:
    """Stack per-example view tensors ``[v, c, h, w]`` into ``[b, v, c, h, w]``.

    Every example must have the same number of views (and the same image shape); the error
    names the counts otherwise. A ``[c, h, w]`` element counts as one view.
    """
    if len(views) == 0:
        raise ValueError("stack_views needs at least one example, got an empty list")
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
    pixels), ``preprocessing`` (a [`PreprocessConfig`][vlakit.vision.PreprocessConfig]) and
    implement
    [`forward_features`][vlakit.vision.VisionEncoder.forward_features],
    [`num_patches`][vlakit.vision.VisionEncoder.num_patches] and
    [`check_image_size`][vlakit.vision.VisionEncoder.check_image_size].

    ``forward`` takes already preprocessed pixels (see
    [`preprocess`][vlakit.vision.VisionEncoder.preprocess]):

    - ``[b, c, h, w]``: one view, returns ``[b, p, d]``;
    - ``[b, v, c, h, w]``: ``v`` views, folded into the batch, encoded, unfolded to
      ``[b, v·p, d]`` (view-major: the ``p`` tokens of view 0, then of view 1, ...);
    - a list of per-example ``[v, c, h, w]`` tensors, stacked with
      [`stack_views`][vlakit.vision.stack_views].

    ``condition [b, k]`` is the FiLM conditioning vector (OpenVLA-OFT: the mean of the
    prompt's language embeddings); it is repeated per view. It is only accepted by an
    encoder with FiLM layers (see [`add_film`][vlakit.vision.add_film]), which in turn
    requires it; [`has_film`][vlakit.vision.VisionEncoder.has_film] tells which (the model
    passes a condition exactly when it is true).
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
        """Whether FiLM layers are attached: then ``forward`` requires ``condition``,
        otherwise it refuses one."""
        return False

    def add_film(
        self, cond_dim: int, zero_init: bool = False, linear: LinearFactory = nn.Linear
    ) -> "VisionEncoder":
        """Attach a FiLM layer to every block (see [`add_film`][vlakit.vision.add_film])."""
        raise TypeError(
            f"{type(self).__name__} does not support FiLM; FiLM can be attached to ViT, "
            "TimmEncoder, FusedEncoder and OpenClipEncoder with a timm trunk"
        )

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
            condition: ``[b, k]`` FiLM conditioning vector: required when
                [`has_film`][vlakit.vision.VisionEncoder.has_film], refused otherwise.
        """
        if isinstance(pixels, (list, tuple)):
            pixels = stack_views(pixels)
        if not isinstance(pixels, Tensor):
            raise TypeError(
                f"pixels must be a tensor or a list of tensors, got {type(pixels).__name__}"
            )
        if pixels.dim() not in (4, 5):
            raise ValueError(
                f"pixels must have 4 dims [b, c, h, w] or 5 dims [b, v, c, h, w], got "
                f"{pixels.dim()} dims with shape {tuple(pixels.shape)}"
            )
        views = pixels.shape[1] if pixels.dim() == 5 else 1
        c, h, w = pixels.shape[-3:]
        if c != self.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_chans} input channels, got {c} "
                f"(pixels shape {tuple(pixels.shape)})"
            )
        self.check_image_size(h, w)
        check_condition(type(self).__name__, self.has_film, condition)
        if condition is not None and condition.shape[0] != pixels.shape[0]:
            raise ValueError(
                f"condition and pixels must have the same batch size, got {condition.shape[0]} "
                f"condition rows for a batch of {pixels.shape[0]} images"
            )
        if pixels.dim() == 4:
            return self.forward_features(pixels, condition)
        flat = rearrange(pixels, "b v c h w -> (b v) c h w")
        if condition is not None:
            condition = repeat(condition, "b k -> (b v) k", v=views)
        tokens = self.forward_features(flat, condition)
        return rearrange(tokens, "(b v) p d -> b (v p) d", v=views)
