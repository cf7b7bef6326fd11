"""Image preprocessing: resize and normalise, on tensors.

Every encoder declares a :class:`PreprocessConfig` (size, mean, std, interpolation), like
timm's ``pretrained_cfg``. :func:`preprocess_images` applies it to a batch of images given
as a tensor (float in ``[0, 1]`` or ``uint8``), ``[b, 3, H, W]`` or ``[b, v, 3, H, W]``;
PIL images and numpy arrays are accepted as a convenience. The resize is *naive* (the
image is stretched to the target size, no crop), as in OpenVLA.

A config whose ``mean``/``std`` hold ``3·k`` values normalises ``k`` copies of the image
with ``k`` different statistics and concatenates them along the channel axis: this is how
:class:`~vlakit.vision.FusedEncoder` builds OpenVLA's 6-channel ``pixel_values``.
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

__all__ = ["PreprocessConfig", "preprocess_images", "images_to_tensor"]


@dataclass(frozen=True)
class PreprocessConfig:
    """How an encoder wants its pixels.

    Args:
        size: target ``(height, width)`` (an int means square).
        mean: per-channel mean; 3 values, or ``3·k`` for ``k`` stacked normalisations.
        std: per-channel std, same length as ``mean``.
        interpolation: ``"bicubic"`` (default, as OpenVLA and timm's ViTs), ``"bilinear"``,
            ``"nearest"`` or ``"area"``.
        antialias: antialias when downsampling with bilinear/bicubic (closer to PIL).

    ``size``, ``mean`` and ``std`` are stored as tuples.
    """

    size: int | Sequence[int]
    mean: Sequence[float]
    std: Sequence[float]
    interpolation: str = "bicubic"
    antialias: bool = True

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"size must be an int or (height, width), got {self.size!r}")
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values but std has {len(std)}")
        if len(mean) == 0 or len(mean) % 3:
            raise ValueError(f"mean/std need 3 values per normalisation, got {len(mean)}")
        modes = ("nearest", "bilinear", "bicubic", "area")
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
            raise ValueError(f"image processor size must give height and width, got {size!r}")
        resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(processor.resample))
        if resample is None:
            raise ValueError(f"unsupported image processor resample {processor.resample!r}")
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
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        if tensor.dim() >= 3 and tensor.shape[-1] == 3 and tensor.shape[-3] != 3:
            tensor = tensor.movedim(-1, -3)
        return tensor
    if isinstance(images, Tensor):
        return images
    raise TypeError(
        f"expected a tensor, a numpy array, a PIL image or a list of them, got {type(images)}"
    )


def preprocess_images(
    images: Any, config: PreprocessConfig
) -> Float[Tensor, "b c h w"] | Float[Tensor, "b v c h w"]:
    """Resize to ``config.size`` and normalise.

    Args:
        images: float in ``[0, 1]`` or ``uint8`` in ``[0, 255]``; ``[b, 3, H, W]``,
            ``[b, v, 3, H, W]`` or one image ``[3, H, W]`` (becomes ``b = 1``). Also a PIL
            image, a numpy array (channels-last allowed) or a list of images, which may
            differ in size (each is resized, then they are stacked along the batch).
        config: the encoder's preprocessing.

    Returns:
        float32 ``[b, c, h, w]`` or ``[b, v, c, h, w]`` with ``(h, w) = config.size`` and
        ``c = config.out_channels`` (3, or 3·k for stacked normalisations).
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images")
        return torch.cat([preprocess_images(_single(img), config) for img in images], dim=0)
    pixels = images_to_tensor(images)
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.dim() not in (4, 5):
        raise ValueError(
            f"images must be [b, 3, H, W] or [b, v, 3, H, W], got {pixels.dim()} dims "
            f"{tuple(pixels.shape)}"
        )
    if pixels.shape[-3] != 3:
        raise ValueError(
            f"images must have 3 (RGB) channels, got {pixels.shape[-3]} "
            f"(shape {tuple(pixels.shape)})"
        )
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 255.0
    elif pixels.is_floating_point():
        pixels = pixels.float()
    else:
        raise ValueError(f"images must be uint8 or floating point, got {pixels.dtype}")
    leading = pixels.shape[:-3]
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    if tuple(flat.shape[-2:]) != config.size:
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
    copies = config.out_channels // 3
    if copies > 1:
        flat = flat.repeat(1, copies, 1, 1)
    mean = torch.tensor(config.mean, dtype=flat.dtype, device=flat.device)[:, None, None]
    std = torch.tensor(config.std, dtype=flat.dtype, device=flat.device)[:, None, None]
    flat = (flat - mean) / std
    return flat.reshape(*leading, *flat.shape[-3:])


def _single(image: Any) -> Tensor:
    """One list element → ``[1, 3, H, W]`` (or ``[1, v, 3, H, W]`` for a view stack)."""
    tensor = images_to_tensor(image)
    return tensor[None] if tensor.dim() in (3, 4) else tensor
