"""pi0's image path (LeRobot / openpi ``resize_with_pad`` then ``x * 2 - 1``), as the
encoder's preprocessing, against the algorithm written here from its description."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlakit.models import pi0_preprocessing
from vlakit.vision import PreprocessConfig, preprocess_images


def _reference(images, size):
    """float [0, 1] [b, 3, H, W] -> scale by the longer side (ints truncated), bilinear,
    clamp, zero-pad centred (odd pixel bottom / right), then 2x - 1."""
    h, w = images.shape[-2:]
    ratio = max(w / size, h / size)
    nh, nw = int(h / ratio), int(w / ratio)
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False)
    out = out.clamp(0, 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = F.pad(out, (left, size - nw - left, top, size - nh - top))
    return out * 2 - 1


@pytest.mark.parametrize("shape", [(37, 50), (50, 37), (21, 21), (9, 64), (100, 100)])
def test_the_letterbox_matches_the_reference(shape):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, *shape, generator=g)
    config = pi0_preprocessing(28)
    torch.testing.assert_close(preprocess_images(images, config), _reference(images, 28),
                               atol=1e-6, rtol=0)
    # uint8 arrays (what a robot sends) go through [0, 1] first; PIL images take the tensor
    # path too, as the references convert them
    array = (np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8)
    as_float = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(preprocess_images(array, config), _reference(as_float, 28),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(preprocess_images(Image.fromarray(array), config),
                               _reference(as_float, 28), atol=1e-6, rtol=0)


def test_padding_is_minus_one_and_centred():
    out = preprocess_images(torch.ones(1, 3, 10, 20), pi0_preprocessing(20))  # [1, 3, 20, 20]
    rows = out[0, 0, :, 0]
    assert torch.all(rows[:5] == -1) and torch.all(rows[5:15] == 1) and torch.all(rows[15:] == -1)


def test_the_stretch_default_is_unchanged_and_a_bad_mode_is_named():
    images = torch.rand(1, 3, 10, 20)
    stretch = PreprocessConfig(size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert preprocess_images(images, stretch).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="resize must be 'stretch' or 'pad', got 'crop'"):
        PreprocessConfig(size=8, mean=(0.5,) * 3, std=(0.5,) * 3, resize="crop")


def test_the_named_builders_use_it():
    from vlakit.models import pi0_3b

    assert pi0_3b(device="meta").encoder.preprocessing == pi0_preprocessing(224)
