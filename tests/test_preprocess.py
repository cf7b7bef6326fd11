"""Image preprocessing: PIL inputs bit-exact to PIL resize + normalise (OpenVLA's
processor), tensors through one float resize, float range checks, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlakit import vision as V

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def random_pil(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth-ish content plus noise, so resampling filters matter
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    noise = rng.integers(-40, 41, (height, width, 3))
    return Image.fromarray(np.clip(big.astype(np.int64) + noise, 0, 255).astype(np.uint8))


def expected_pil(
    image: Image.Image, size: tuple[int, int], mean, std, resample=Image.Resampling.BICUBIC
) -> torch.Tensor:
    """The reference written independently with PIL and numpy: PIL resize, ``/ 255``,
    ``(x - mean) / std`` in float32, channels first, batch of one."""
    h, w = size
    array = np.asarray(image.convert("RGB").resize((w, h), resample)).astype(np.float32)
    array = array / np.float32(255.0)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    normalised = (array - mean) / std  # [h, w, 3]
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))[None]


# ---------------------------------------------------------------- PIL: bit-exact
@pytest.mark.parametrize(
    ("source", "target"),
    [((256, 320), (224, 224)), ((480, 640), (224, 224)), ((224, 224), (224, 224)),
     ((30, 20), (56, 42))],  # the last one: a non-square upsample
)
def test_pil_input_is_bit_exact_to_pil_resize_and_normalise(source, target):
    image = random_pil(*source)
    config = V.PreprocessConfig(target, mean=DINO_MEAN, std=DINO_STD)
    out = V.preprocess_images(image, config)
    assert out.dtype == torch.float32 and out.shape == (1, 3, *target)
    assert torch.equal(out, expected_pil(image, target, DINO_MEAN, DINO_STD))


@pytest.mark.parametrize(
    ("interpolation", "resample"),
    [("bilinear", Image.Resampling.BILINEAR), ("nearest", Image.Resampling.NEAREST),
     ("area", Image.Resampling.BOX)],
)
def test_pil_input_uses_the_pil_filter_of_the_interpolation(interpolation, resample):
    image = random_pil(256, 320, seed=1)
    config = V.PreprocessConfig(224, mean=HALF, std=HALF, interpolation=interpolation)
    expected = expected_pil(image, (224, 224), HALF, HALF, resample)
    assert torch.equal(V.preprocess_images(image, config), expected)
    # and not the bicubic result
    bicubic = expected_pil(image, (224, 224), HALF, HALF)
    assert not torch.equal(expected, bicubic)


def test_fused_six_channel_pil_input_is_bit_exact():
    image = random_pil(256, 320, seed=2)
    config = V.PreprocessConfig(224, mean=DINO_MEAN + HALF, std=DINO_STD + HALF)
    expected = torch.cat(
        [expected_pil(image, (224, 224), DINO_MEAN, DINO_STD),
         expected_pil(image, (224, 224), HALF, HALF)],
        dim=1,
    )
    assert torch.equal(V.preprocess_images(image, config), expected)
    # the FusedEncoder's own preprocess (each tower resizes with PIL itself) agrees
    dino = V.vit(img_size=224, patch_size=14, dim=32, depth=1, num_heads=2, mlp_dim=64,
                 preprocessing=V.PreprocessConfig(224, mean=DINO_MEAN, std=DINO_STD))
    siglip = V.vit(img_size=224, patch_size=14, dim=32, depth=1, num_heads=2, mlp_dim=64)
    fused = V.FusedEncoder([dino, siglip])
    assert torch.equal(fused.preprocess(image), expected)
    assert torch.equal(fused.preprocess([image, image]), torch.cat([expected, expected]))


def test_list_of_pil_images_of_different_sizes():
    images = [random_pil(256, 320, seed=3), random_pil(100, 90, seed=4), random_pil(224, 224)]
    config = V.PreprocessConfig(224, mean=HALF, std=HALF)
    out = V.preprocess_images(images, config)
    assert out.shape == (3, 3, 224, 224)
    for i, image in enumerate(images):
        assert torch.equal(out[i : i + 1], expected_pil(image, (224, 224), HALF, HALF))


def test_pil_non_rgb_modes_are_converted_first():
    grey = random_pil(64, 48, seed=5).convert("L")
    config = V.PreprocessConfig(32, mean=HALF, std=HALF)
    out = V.preprocess_images(grey, config)
    assert torch.equal(out, expected_pil(grey, (32, 32), HALF, HALF))
    assert torch.equal(out[:, 0], out[:, 1])  # grey stays grey


# ---------------------------------------------------------------- tensors: one float pass
def test_tensor_and_numpy_inputs_take_one_float_resize():
    image = random_pil(256, 320, seed=6)
    array = np.asarray(image)  # [h, w, 3] uint8
    config = V.PreprocessConfig(224, mean=HALF, std=HALF)
    as_uint8 = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
    resized = F.interpolate(
        as_uint8.float() / 255, size=(224, 224), mode="bicubic", align_corners=False,
        antialias=True,
    ).clamp(0, 1)
    expected = (resized - 0.5) / 0.5
    torch.testing.assert_close(V.preprocess_images(as_uint8, config), expected)
    torch.testing.assert_close(V.preprocess_images(array, config), expected)  # channels-last
    torch.testing.assert_close(V.preprocess_images(as_uint8.float() / 255, config), expected)
    # the float path is not PIL's two rounded passes: visibly different at 256x320
    pil = V.preprocess_images(image, config)
    assert (pil - expected).abs().max() > 0.02
    # at the target size neither path resizes: identical
    small = random_pil(224, 224, seed=7)
    small_tensor = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1)
    from_tensor = V.preprocess_images(small_tensor, config)
    assert torch.equal(from_tensor, V.preprocess_images(small, config))


def test_uint8_float_numpy_agree_and_views_and_grey():
    pre = V.PreprocessConfig(28, mean=HALF, std=HALF)
    array = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    as_uint8 = torch.from_numpy(array).permute(2, 0, 1)[None]
    from_uint8 = V.preprocess_images(as_uint8, pre)
    assert from_uint8.shape == (1, 3, 28, 28) and from_uint8.dtype == torch.float32
    torch.testing.assert_close(V.preprocess_images(as_uint8.float() / 255, pre), from_uint8)
    torch.testing.assert_close(V.preprocess_images(array, pre), from_uint8)
    # a list mixing a PIL image and a tensor of other sizes: each resized, then stacked
    batch = V.preprocess_images([Image.fromarray(array), torch.rand(3, 64, 64)], pre)
    assert batch.shape == (2, 3, 28, 28)
    # views
    views = V.preprocess_images(torch.rand(2, 3, 3, 40, 30), pre)
    assert views.shape == (2, 3, 3, 28, 28)
    # normalisation: 0.5 grey → 0 for mean = std = 0.5; size already right → no resize
    grey = V.preprocess_images(torch.full((1, 3, 28, 28), 0.5), pre)
    assert torch.equal(grey, torch.zeros_like(grey))


# ---------------------------------------------------------------- float range
def test_float_images_outside_unit_range_are_refused():
    pre = V.PreprocessConfig(28, mean=HALF, std=HALF)
    as_255 = torch.rand(1, 3, 28, 28) * 255
    as_255[0, 0, 0, 0], as_255[0, 0, 0, 1] = 0.0, 255.0
    with pytest.raises(ValueError) as info:
        V.preprocess_images(as_255, pre)
    message = str(info.value)
    assert "range from 0 to 255" in message
    assert "uint8 images with values in [0, 255]" in message
    assert "float images in [0, 1]" in message
    with pytest.raises(ValueError, match=r"range from -1 to 1;"):
        V.preprocess_images(_corners(-1.0, 1.0), pre)  # already normalised to [-1, 1]
    with pytest.raises(ValueError, match=r"from 0 to 1\.01"):
        V.preprocess_images(_corners(0.0, 1.01), pre)
    with pytest.raises(ValueError, match="nan"):
        V.preprocess_images(torch.full((1, 3, 28, 28), float("nan")), pre)
    # also through numpy and lists
    with pytest.raises(ValueError, match="range from"):
        V.preprocess_images(np.full((28, 28, 3), 7.0, dtype=np.float32), pre)
    with pytest.raises(ValueError, match="range from"):
        V.preprocess_images([torch.full((3, 28, 28), 2.0)], pre)


def _corners(low: float, high: float) -> torch.Tensor:
    """An image in [0, 1] whose extremes are exactly ``low`` and ``high``."""
    image = torch.rand(1, 3, 28, 28) * 0.5 + 0.25
    image[0, 0, 0, 0], image[0, 0, 0, 1] = low, high
    return image


def test_float_range_tolerates_rounding():
    pre = V.PreprocessConfig(28, mean=HALF, std=HALF)
    out = V.preprocess_images(_corners(-5e-4, 1 + 5e-4), pre)
    assert torch.isfinite(out).all()
    out = V.preprocess_images(_corners(0.0, 1.0).double(), pre)
    assert out.dtype == torch.float32


def test_float_range_check_is_skipped_while_compiling(monkeypatch):
    pre = V.PreprocessConfig(28, mean=HALF, std=HALF)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = V.preprocess_images(torch.full((1, 3, 28, 28), 255.0), pre)
    assert torch.equal(out, torch.full_like(out, 509.0))  # (255 - 0.5) / 0.5, unchecked


# ---------------------------------------------------------------- bad input
def test_preprocess_bad_input_messages():
    pre = V.PreprocessConfig(28, mean=HALF, std=HALF)
    with pytest.raises(ValueError, match=r"3 \(RGB\) channels, got 4"):
        V.preprocess_images(torch.rand(1, 4, 28, 28), pre)
    with pytest.raises(ValueError, match="mean has 3 values and std has 2"):
        V.PreprocessConfig(28, mean=HALF, std=(0.5,) * 2)
    with pytest.raises(ValueError, match="multiple of 3, got 4"):
        V.PreprocessConfig(28, mean=(0.5,) * 4, std=(0.5,) * 4)
    with pytest.raises(ValueError, match=r"interpolation must be one of .*got 'lanczos'"):
        V.PreprocessConfig(28, mean=HALF, std=HALF, interpolation="lanczos")
    with pytest.raises(ValueError, match="uint8 .* or floating point .*got dtype torch.int32"):
        V.preprocess_images(torch.zeros(1, 3, 28, 28, dtype=torch.int32), pre)
    with pytest.raises(ValueError, match="empty list"):
        V.preprocess_images([], pre)
    with pytest.raises(TypeError, match="got a str"):
        V.preprocess_images("image.png", pre)
    with pytest.raises(ValueError, match=r"got 2 dims with shape \(28, 28\)"):
        V.preprocess_images(torch.rand(28, 28), pre)
