"""Image preprocessing: resize and normalise.

Every encoder declares a [`PreprocessConfig`][vlakit.vision.PreprocessConfig] (size, mean,
std, interpolation), like timm's ``pretrained_cfg``.
[`preprocess_images`][vlakit.vision.preprocess_images] applies it. The resize is *naive*
(the image is stretched to the target size, no crop), as in OpenVLA. What each input type
gets:

- **PIL images** (one, or a list of them): converted to RGB and resized by PIL itself,
  ``image.resize((w, h), filter)`` with the config's interpolation mapped to PIL's filter
  (``bicubic`` → ``BICUBIC``, ``bilinear`` → ``BILINEAR``, ``nearest`` → ``NEAREST``,
  ``area`` → ``BOX``), still ``uint8``; then divided by 255 and normalised in float32. This
  is bit-exact to OpenVLA's processor (prismatic: PIL resize, ``to_tensor``, normalise) at
  any input size. PIL resizes in two separable passes, rounds to ``uint8`` between and
  after them, and always antialiases when downsampling (``antialias`` does not apply).
- **Tensors and numpy arrays** (``uint8`` in ``[0, 255]`` or float in ``[0, 1]``; numpy
  may be channels-last): converted to float32 in ``[0, 1]`` and resized in one float pass
  with ``torch.nn.functional.interpolate`` (antialiased for bilinear/bicubic when
  ``antialias``; bicubic output clamped to ``[0, 1]``), never rounded to ``uint8``. This
  runs on any device, batched, but is not PIL: with bicubic, a 256x320 image resized to
  224 differs from the PIL result by up to about 0.19 (normalised units). Images already at
  the target size are not resized, so both paths agree there.

Float images outside ``[0, 1]`` (beyond a ``1e-3`` rounding tolerance) raise a
``ValueError`` naming the range found; the check reads the values, so it runs for CPU
tensors only and is skipped while ``torch.compile`` traces.

A config whose ``mean``/``std`` hold ``3·k`` values normalises ``k`` copies of the image
with ``k`` different statistics and concatenates them along the channel axis: this is how
[`FusedEncoder`][vlakit.vision.FusedEncoder] builds OpenVLA's 6-channel ``pixel_values``.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from vlakit.core.checks import should_validate

__all__ = ["PreprocessConfig", "preprocess_images", "images_to_tensor"]

FLOAT_RANGE_TOLERANCE = 1e-3
"""How far float images may stray outside ``[0, 1]`` (rounding) before they are refused."""

PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
}
"""The PIL filter each interpolation name maps to for PIL inputs."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How an encoder wants its pixels.

    Args:
        size: target ``(height, width)`` (an int means square).
        mean: per-channel mean; 3 values, or ``3·k`` for ``k`` stacked normalisations.
        std: per-channel std, same length as ``mean``.
        interpolation: ``"bicubic"`` (default, as OpenVLA and timm's ViTs), ``"bilinear"``,
            ``"nearest"`` or ``"area"``.
        antialias: antialias when downsampling tensors with bilinear/bicubic (closer to
            PIL; PIL inputs are always antialiased by PIL itself).
        resize: ``"stretch"`` (default): every image resized to ``size`` whatever its aspect
            ratio; ``"pad"``: openpi's and LeRobot's pi0 letterbox (``resize_with_pad``): scale
            by ``max(W / w, H / h)`` (sizes truncated to ints), resize as ``interpolation``
            says (tensors, ``align_corners=False``), clamp to ``[0, 1]``, then pad with zeros
            centred (the odd pixel at the bottom / right) to ``size``; PIL images take the
            tensor path in this mode, as the references convert them first.

    ``size``, ``mean`` and ``std`` are stored as tuples.
    """

    size: int | Sequence[int]
    mean: Sequence[float]
    std: Sequence[float]
    interpolation: str = "bicubic"
    antialias: bool = True
    resize: str = "stretch"

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(
                f"size must be a positive int or a (height, width) pair, got {self.size!r}"
            )
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != len(std):
            raise ValueError(
                f"mean and std must have the same length, but mean has {len(mean)} values "
                f"and std has {len(std)}"
            )
        if len(mean) == 0 or len(mean) % 3:
            raise ValueError(
                "mean and std need 3 values (R, G, B) per normalisation, so a multiple of 3, "
                f"got {len(mean)}"
            )
        if any(s == 0 for s in std):
            raise ValueError(f"std must not contain zeros, got {std}")
        if self.resize not in ("stretch", "pad"):
            raise ValueError(f"resize must be 'stretch' or 'pad', got {self.resize!r}")
        modes = tuple(PIL_FILTERS)
        if self.interpolation not in modes:
            raise ValueError(f"interpolation must be one of {modes}, got {self.interpolation!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def out_channels(self) -> int:
        """Channels of the preprocessed tensor (``len(mean)``)."""
        return len(self.mean)

    @classmethod
    def from_timm(cls, model: torch.nn.Module) -> "PreprocessConfig":
        """Mean, std and interpolation from a timm model's ``pretrained_cfg``; size from its
        patch embedding (the size the model was built for)."""
        from timm.data import resolve_data_config

        data = resolve_data_config({}, model=model)
        size = tuple(model.patch_embed.img_size) if hasattr(model, "patch_embed") else None
        return cls(
            size=size or tuple(data["input_size"][1:]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bicubic"),
        )

    @classmethod
    def from_hf_image_processor(cls, processor: Any) -> "PreprocessConfig":
        """From a transformers image processor (``size``, ``image_mean``, ``image_std``,
        ``resample``). Only fixed-size processors (``height``/``width``) are supported."""
        size = processor.size
        height = getattr(size, "height", None) if not isinstance(size, dict) else size.get("height")
        width = getattr(size, "width", None) if not isinstance(size, dict) else size.get("width")
        if height is None or width is None:
            raise ValueError(
                "only fixed-size image processors are supported: size must give height and "
                f"width, got {size!r}"
            )
        resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(processor.resample))
        if resample is None:
            raise ValueError(
                "image processor resample must be 0 (nearest), 2 (bilinear) or 3 (bicubic), "
                f"got {processor.resample!r}"
            )
        return cls(
            size=(int(height), int(width)),
            mean=tuple(processor.image_mean),
            std=tuple(processor.image_std),
            interpolation=resample,
        )


def images_to_tensor(images: Any) -> Tensor:
    """PIL image / numpy array / tensor → tensor ``[..., 3, H, W]`` (dtype kept).

    numpy arrays whose last axis has 3 entries (and first does not) are read as
    ``[..., H, W, 3]`` (channels-last) and moved to channels-first.
    """
    if isinstance(images, Image.Image):
        array = np.asarray(images.convert("RGB"))
        return rearrange(torch.from_numpy(array.copy()), "h w c -> c h w")
    if isinstance(images, np.ndarray):
        array = np.ascontiguousarray(images)
        if not array.flags.writeable:  # e.g. np.asarray(pil_image); torch wants writable
            array = array.copy()
        tensor = torch.from_numpy(array)
        if tensor.dim() >= 3 and tensor.shape[-1] == 3 and tensor.shape[-3] != 3:
            tensor = tensor.movedim(-1, -3)
        return tensor
    if isinstance(images, Tensor):
        return images
    raise TypeError(
        "images must be a tensor, a numpy array, a PIL image or a list of them, got a "
        f"{type(images).__name__}"
    )


def preprocess_images(
    images: Any, config: PreprocessConfig
) -> Float[Tensor, "b c h w"] | Float[Tensor, "b v c h w"]:
    """Resize to ``config.size`` and normalise.

    PIL images are resized by PIL (bit-exact to OpenVLA's processor), tensors and numpy
    arrays by one float ``F.interpolate`` pass; the docstring of the module
    ``vlakit.vision.preprocess`` says exactly what each gets.

    Args:
        images: a tensor or numpy array, ``uint8`` in ``[0, 255]`` or float in ``[0, 1]``
            (outside it, beyond ``1e-3``, raises), ``[b, 3, H, W]``, ``[b, v, 3, H, W]`` or
            one image ``[3, H, W]`` (becomes ``b = 1``), numpy also channels-last; or a PIL
            image (``b = 1``); a list of lists, one list of views per example (``[[front,
            wrist], [front, wrist]]`` gives ``[b, v, c, h, w]``); or a list of such images,
            which may differ in size (each is
            resized, then they are stacked along the batch: ``b = len(images)``).
        config: the encoder's preprocessing.

    Returns:
        float32 ``[b, c, h, w]`` or ``[b, v, c, h, w]`` with ``(h, w) = config.size`` and
        ``c = config.out_channels`` (3, or 3·k for stacked normalisations).

    Raises:
        ValueError: empty list, wrong rank or channel count, integer dtype other than
            ``uint8``, float values outside ``[0, 1]``, list items of different ranks.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("preprocess_images got an empty list of images")
        if all(isinstance(img, (list, tuple)) for img in images):
            # one list of views per example: [[view0, view1], [view0, view1], ...]
            stacks = [preprocess_images(list(views), config) for views in images]  # [v, c, h, w]
            if any(stack.dim() != 4 for stack in stacks):
                raise ValueError(
                    "in a list of view lists each view must be one image ([3, H, W], an array "
                    f"or a PIL image); got view stacks of shapes "
                    f"{[tuple(stack.shape) for stack in stacks]}"
                )
            shapes = {tuple(stack.shape) for stack in stacks}
            if len(shapes) > 1:
                raise ValueError(
                    f"every example needs the same number of views; got view stacks of "
                    f"shapes {sorted(shapes)}"
                )
            return torch.stack(stacks)  # [b, v, c, h, w]
        parts = [preprocess_images(_single(img), config) for img in images]
        ranks = [part.dim() for part in parts]
        if len(set(ranks)) > 1:
            raise ValueError(
                "list items must all be single images or all view stacks [v, 3, H, W], got "
                f"a mix (shapes after preprocessing {[tuple(p.shape) for p in parts]})"
            )
        return torch.cat(parts, dim=0)
    if isinstance(images, Image.Image) and config.resize == "stretch":
        return _normalise(_pil_resize(images, config)[None].float() / 255.0, config)
    pixels = images_to_tensor(images)
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.dim() not in (4, 5):
        raise ValueError(
            f"images must have 4 dims [b, 3, H, W] or 5 dims [b, v, 3, H, W] (or 3 for one "
            f"image), got {pixels.dim()} dims with shape {tuple(pixels.shape)}"
        )
    if pixels.shape[-3] != 3:
        hint = ""
        if pixels.shape[-1] == 3:
            hint = (
                "; this looks channels-last [..., H, W, 3]: tensors must be channels-first, "
                "e.g. images.permute(0, 3, 1, 2) (numpy arrays are moved automatically)"
            )
        raise ValueError(
            f"images must have 3 (RGB) channels, got {pixels.shape[-3]} at dim -3 "
            f"(shape {tuple(pixels.shape)}){hint}"
        )
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 255.0
    elif pixels.is_floating_point():
        pixels = pixels.float()
        _check_float_range(pixels)
    else:
        raise ValueError(
            f"images must be uint8 (values 0 to 255) or floating point (values 0 to 1), got "
            f"dtype {pixels.dtype}"
        )
    leading = pixels.shape[:-3]
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    if config.resize == "pad":
        flat = _resize_with_pad(flat, config)
    elif tuple(flat.shape[-2:]) != config.size:
        interp = config.interpolation
        smooth = interp in ("bilinear", "bicubic")
        flat = F.interpolate(
            flat,
            size=config.size,
            mode=interp,
            align_corners=False if smooth else None,
            antialias=config.antialias and smooth,
        )
        if interp == "bicubic":  # bicubic overshoots; PIL clips to the valid range too
            flat = flat.clamp(0.0, 1.0)
    flat = _normalise(flat, config)
    return flat.reshape(*leading, *flat.shape[-3:])


def _resize_with_pad(flat: Float[Tensor, "n 3 H W"], config: PreprocessConfig) -> Tensor:
    """The letterbox of ``resize="pad"`` on float ``[0, 1]`` images ``[n, 3, H, W]``."""
    height, width = config.size
    cur_h, cur_w = flat.shape[-2:]
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    interp = config.interpolation
    smooth = interp in ("bilinear", "bicubic")
    flat = F.interpolate(flat, size=(new_h, new_w), mode=interp,
                         align_corners=False if smooth else None,
                         antialias=config.antialias and smooth).clamp(0.0, 1.0)
    top, extra_h = divmod(height - new_h, 2)
    left, extra_w = divmod(width - new_w, 2)
    return F.pad(flat, (left, left + extra_w, top, top + extra_h), value=0.0)


def _pil_resize(image: Image.Image, config: PreprocessConfig) -> Tensor:
    """PIL image → RGB, resized by PIL to ``config.size`` → ``uint8 [3, h, w]``."""
    image = image.convert("RGB")
    height, width = config.size
    if image.size != (width, height):
        image = image.resize((width, height), PIL_FILTERS[config.interpolation])
    return rearrange(torch.from_numpy(np.array(image)), "h w c -> c h w")


def _normalise(flat: Tensor, config: PreprocessConfig) -> Tensor:
    """``[n, 3, h, w]`` float in ``[0, 1]`` → ``(x - mean) / std``, ``k`` copies for ``3·k``
    statistics, concatenated along the channels."""
    copies = config.out_channels // 3
    if copies > 1:
        flat = flat.repeat(1, copies, 1, 1)
    mean = torch.tensor(config.mean, dtype=flat.dtype, device=flat.device)[:, None, None]
    std = torch.tensor(config.std, dtype=flat.dtype, device=flat.device)[:, None, None]
    return (flat - mean) / std


def _check_float_range(pixels: Tensor) -> None:
    """Refuse float images outside ``[0, 1]``: a value check, so it runs on CPU tensors
    always and on accelerator tensors while validation is on (the default; see
    [`validation`][vlakit.core.validation]); skipped while ``torch.compile`` traces."""
    if pixels.numel() == 0 or not should_validate(pixels):
        return
    low, high = (float(v) for v in torch.aminmax(pixels))
    tol = FLOAT_RANGE_TOLERANCE
    if not (-tol <= low and high <= 1.0 + tol):  # also catches NaN
        raise ValueError(
            f"float images must hold values in [0, 1], but these range from {low:g} to "
            f"{high:g}; pass uint8 images with values in [0, 255], or float images in [0, 1] "
            "(e.g. divide by 255)"
        )


def _single(image: Any) -> Tensor | Image.Image:
    """One list element → ``[1, 3, H, W]`` (``[1, v, 3, H, W]`` for a view stack); a PIL
    image is returned as it is (resized by PIL)."""
    if isinstance(image, Image.Image):
        return image
    tensor = images_to_tensor(image)
    return tensor[None] if tensor.dim() in (3, 4) else tensor
