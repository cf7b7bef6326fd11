"""Encoder wrappers, fused encoders, camera views, preprocessing and bad input."""

import pytest
import torch
import transformers
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from timm.models.vision_transformer import VisionTransformer

from vlakit import convert as C
from vlakit import projectors as P
from vlakit import vision as V


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def tiny_vit(**kw) -> V.ViT:
    args = dict(img_size=28, patch_size=14, dim=48, depth=3, num_heads=4, mlp_dim=96)
    return V.vit(**{**args, **kw}).eval()


def tiny_dinov2_like(**kw) -> V.ViT:
    pre = V.PreprocessConfig(28, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return tiny_vit(
        layer_scale_init=1e-5, class_token=True, reg_tokens=4, dim=32, preprocessing=pre, **kw
    )


def tiny_timm(**kw) -> VisionTransformer:
    args = dict(
        img_size=28,
        patch_size=14,
        embed_dim=48,
        depth=3,
        num_heads=4,
        num_classes=0,
        class_token=True,
        reg_tokens=4,
        no_embed_class=True,
        init_values=0.5,
    )
    return VisionTransformer(**{**args, **kw}).eval()


def tiny_hf_siglip() -> transformers.SiglipVisionModel:
    config = transformers.SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    return transformers.SiglipVisionModel(config).eval()


# ---------------------------------------------------------------- the shared interface
def encoders() -> dict[str, V.VisionEncoder]:
    clip_cfg = CLIPVisionCfg(layers=2, width=48, head_width=16, patch_size=14, image_size=28)
    return {
        "vit": tiny_vit(),
        "timm": V.TimmEncoder(tiny_timm()),
        "open_clip": V.OpenClipEncoder(_build_vision_tower(32, clip_cfg).eval()),
        "hf": V.HFVisionEncoder(
            tiny_hf_siglip(), transformers.SiglipImageProcessor(size={"height": 28, "width": 28})
        ),
        "fused": V.FusedEncoder([tiny_dinov2_like(), tiny_vit()]),
    }


@torch.no_grad()
@pytest.mark.parametrize("name", ["vit", "timm", "open_clip", "hf", "fused"])
def test_every_encoder_declares_dim_patches_preprocessing_and_handles_views(name):
    enc = encoders()[name]
    assert enc.image_size == (28, 28) and enc.patches_per_image == 4 == enc.num_patches(28)
    images = torch.rand(2, 3, 3, 40, 30)  # [b, v, 3, H, W], raw
    pixels = enc.preprocess(images)
    assert pixels.shape == (2, 3, enc.in_chans, 28, 28)
    tokens = enc(pixels)
    assert tokens.shape == (2, 3 * 4, enc.dim)
    # views are folded into the batch: view-major concatenation of per-view encodings
    per_view = torch.cat([enc(pixels[:, v]) for v in range(3)], dim=1)
    assert_close(tokens, per_view)
    # a list of per-example view stacks is the same as the stacked tensor
    assert_close(enc([pixels[0], pixels[1]]), tokens)


@torch.no_grad()
def test_timm_encoder_matches_timm_and_own_vit():
    ref = tiny_timm()
    x = torch.randn(2, 3, 28, 28)
    enc = V.TimmEncoder(ref)
    assert enc.preprocessing.mean == (0.485, 0.456, 0.406)
    assert_close(enc(x), ref.forward_features(x)[:, 5:])
    own = C.vit_from_timm(ref)
    assert_close(own(x), enc(x))
    mid = V.TimmEncoder(ref, output_layer=-2)
    expected = ref.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")[
        0
    ]
    assert_close(mid(x), expected)
    own.set_output_layer(-2)
    assert_close(own(x), expected)
    mid.truncate()
    assert len(ref.blocks) == 2
    assert_close(mid(x), expected)


def test_timm_encoder_by_name():
    enc = V.TimmEncoder(
        "vit_large_patch14_reg4_dinov2",
        img_size=28,
        embed_dim=32,
        depth=2,
        num_heads=2,
        output_layer=-2,
    )
    assert enc.dim == 32 and enc.patches_per_image == 4 and enc.image_size == (28, 28)
    assert enc.preprocessing.mean == (0.485, 0.456, 0.406)
    assert enc.preprocessing.interpolation == "bicubic"
    assert enc(torch.randn(1, 3, 28, 28)).shape == (1, 4, 32)


@torch.no_grad()
def test_open_clip_encoder_native_tower_matches_open_clip():
    cfg = CLIPVisionCfg(
        layers=3, width=48, head_width=16, patch_size=14, image_size=28, output_tokens=True
    )
    visual = _build_vision_tower(32, cfg).eval()
    x = torch.randn(2, 3, 28, 28)
    _, tokens = visual(x)
    enc = V.OpenClipEncoder(visual)
    assert enc.dim == 48
    assert_close(enc(x), tokens)
    mid = V.OpenClipEncoder(visual, output_layer=1)
    ref = visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")
    assert_close(mid(x), ref["image_intermediates"][0])


@torch.no_grad()
def test_open_clip_encoder_timm_trunk():
    cfg = CLIPVisionCfg(
        timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear", image_size=224
    )
    visual = _build_vision_tower(32, cfg).eval()
    enc = V.OpenClipEncoder(visual, output_layer=-2)
    assert enc.dim == 192 and enc.patches_per_image == 196
    assert enc.preprocessing.mean[0] == pytest.approx(0.48145466)  # open_clip's default
    x = torch.randn(1, 3, 224, 224)
    expected = visual.trunk.forward_intermediates(
        x, indices=[10], intermediates_only=True, output_fmt="NLC"
    )[0]
    assert_close(enc(x), expected)
    # the trunk is held once, under ``visual.`` (no duplicate keys)
    assert list(enc.state_dict()) == [f"visual.{k}" for k in visual.state_dict()]


@torch.no_grad()
def test_hf_encoder_matches_transformers_and_truncates():
    model = tiny_hf_siglip()
    x = torch.randn(2, 3, 28, 28)
    out = model(pixel_values=x, output_hidden_states=True)
    pre = transformers.SiglipImageProcessor(size={"height": 28, "width": 28})
    enc = V.HFVisionEncoder(model, pre)
    assert (
        enc.preprocessing.mean == (0.5, 0.5, 0.5) and enc.preprocessing.interpolation == "bicubic"
    )
    assert_close(enc(x), out.last_hidden_state)
    mid = V.HFVisionEncoder(model, enc.preprocessing, output_layer=-2)
    assert_close(mid(x), out.hidden_states[2])
    mid.truncate()
    assert len(model.encoder.layers) == 2
    assert_close(mid(x), out.hidden_states[2])


# ---------------------------------------------------------------- fused
@torch.no_grad()
def test_fused_encoder_preprocess_is_openvla_six_channels_and_forward_splits_them():
    dino, siglip = tiny_dinov2_like(), tiny_vit(gelu_approximate="tanh")
    fused = V.FusedEncoder([dino, siglip])
    assert fused.dim == 32 + 48 and fused.in_chans == 6
    assert fused.preprocessing.mean == (0.485, 0.456, 0.406, 0.5, 0.5, 0.5)
    images = (torch.rand(2, 3, 56, 56) * 255).to(torch.uint8)
    pixels = fused.preprocess(images)
    assert pixels.shape == (2, 6, 28, 28)
    assert_close(pixels[:, 0:3], dino.preprocess(images))
    assert_close(pixels[:, 3:6], siglip.preprocess(images))
    # the combined config produces the same 6 channels in one go
    assert_close(V.preprocess_images(images, fused.preprocessing), pixels)
    tokens = fused(pixels)
    assert tokens.shape == (2, 4, 80)
    assert_close(tokens, torch.cat([dino(pixels[:, :3]), siglip(pixels[:, 3:])], dim=-1))


def test_fused_encoder_rejects_mismatched_patch_counts():
    with pytest.raises(ValueError, match=r"same number of patches, got \[4, 1\]"):
        V.FusedEncoder([tiny_vit(), tiny_vit(patch_size=28)])


# ---------------------------------------------------------------- bad input
def test_wrong_channel_count_names_expected_and_actual():
    with pytest.raises(ValueError, match="expects 3 input channels, got 4"):
        tiny_vit()(torch.randn(1, 4, 28, 28))
    with pytest.raises(ValueError, match="expects 6 input channels, got 3"):
        V.FusedEncoder([tiny_dinov2_like(), tiny_vit()])(torch.randn(1, 3, 28, 28))


def test_image_size_not_divisible_or_not_the_built_size():
    vit = tiny_vit()
    # not divisible: the message still names the size the model expects
    with pytest.raises(
        ValueError,
        match=r"image size 30x28 \(height x width\) is not divisible by the patch size 14x14; "
        r"this encoder expects exactly 28x28",
    ):
        vit(torch.randn(1, 3, 30, 28))
    with pytest.raises(
        ValueError, match=r"expected image size 28x28 \(height x width; .* 2x2 patches\), got 42x42"
    ):
        vit(torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match=r"expected image size 28x28 .*got 42x42"):
        V.TimmEncoder(tiny_timm())(torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match=r"not divisible .* expects exactly 28x28"):
        V.TimmEncoder(tiny_timm())(torch.randn(1, 3, 29, 28))
    dynamic = tiny_vit(dynamic_img_size=True)
    assert dynamic(torch.randn(1, 3, 42, 56)).shape == (1, 12, 48)
    with pytest.raises(ValueError, match=r"expects a multiple of the patch size 14x14"):
        dynamic(torch.randn(1, 3, 43, 56))


def test_mismatched_views_name_the_counts():
    views = [torch.randn(2, 3, 28, 28), torch.randn(3, 3, 28, 28)]
    with pytest.raises(ValueError, match=r"view counts \[2, 3\].*example 1 has 3, expected 2"):
        V.stack_views(views)
    with pytest.raises(ValueError, match=r"view counts \[2, 3\]"):
        tiny_vit()(views)
    # wrong rank: a ValueError naming the dims, or jaxtyping's TypeCheckError (a TypeError)
    # first when shape checking is on, as in this test suite
    with pytest.raises((ValueError, TypeError), match=r"6 dims|f32\[1,1,2,3,28,28\]"):
        tiny_vit()(torch.randn(1, 1, 2, 3, 28, 28))


def test_projector_width_must_match_encoder():
    vit = tiny_vit()
    tokens = vit(torch.randn(1, 3, 28, 28))
    projector = P.MLPProjector([64, 128, 32])
    with pytest.raises(ValueError, match="expects input width 64, got 48"):
        projector(tokens)
