"""FiLM conditioning (OpenVLA-OFT) on the own ViT and on timm ViTs."""

import pytest
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer

from vlakit import convert as C
from vlakit import vision as V


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def tiny_vit(**kw) -> V.ViT:
    args = dict(
        img_size=28,
        patch_size=14,
        dim=48,
        depth=3,
        num_heads=4,
        mlp_dim=96,
        layer_scale_init=0.5,
        class_token=True,
    )
    return V.vit(**{**args, **kw}).eval()


def tiny_timm_encoder(**kw) -> V.TimmEncoder:
    model = VisionTransformer(
        img_size=28,
        patch_size=14,
        embed_dim=48,
        depth=3,
        num_heads=4,
        num_classes=0,
        reg_tokens=2,
        no_embed_class=True,
        init_values=0.5,
    ).eval()
    return V.TimmEncoder(model, **kw)


def make_encoders() -> dict:
    return {
        "vit": tiny_vit(),
        "vit_layer_-2": tiny_vit(output_layer=-2),
        "timm": tiny_timm_encoder(),
        "timm_layer_-2": tiny_timm_encoder(output_layer=-2),
    }


@torch.no_grad()
@pytest.mark.parametrize("name", ["vit", "vit_layer_-2", "timm", "timm_layer_-2"])
def test_zero_initialised_film_equals_no_film(name):
    enc = make_encoders()[name]
    x, cond = torch.randn(2, 3, 28, 28), torch.randn(2, 16)
    plain = enc(x)
    V.add_film(enc, cond_dim=16, zero_init=True)
    assert enc.has_film
    assert_close(enc(x, cond), plain)


@pytest.mark.parametrize("name", ["vit", "timm"])
def test_nonzero_film_changes_output_and_trains(name):
    enc = make_encoders()[name]
    x, cond = torch.randn(2, 3, 28, 28), torch.randn(2, 16)
    with torch.no_grad():
        plain = enc(x)
    V.add_film(enc, cond_dim=16)  # default nn.Linear init, as OFT
    out = enc(x, cond)
    assert not torch.allclose(out, plain, atol=1e-3)
    out.square().mean().backward()
    films = [m for m in enc.modules() if isinstance(m, V.FiLM)]
    assert len(films) == 3
    for film in films:
        assert film.scale.weight.grad is not None and film.scale.weight.grad.abs().sum() > 0
        assert film.shift.weight.grad is not None and film.shift.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_own_vit_and_timm_agree_with_film():
    timm_enc = tiny_timm_encoder()
    own = C.vit_from_timm(timm_enc.model)
    V.add_film(timm_enc, 16)
    V.add_film(own, 16)
    own_sd = own.state_dict()
    for i, block in enumerate(timm_enc.model.blocks):  # same FiLM weights in both
        block.film.load_state_dict(
            {
                k.split("film.", 1)[1]: v
                for k, v in own_sd.items()
                if k.startswith(f"blocks.{i}.film.")
            }
        )
    x, cond = torch.randn(2, 3, 28, 28), torch.randn(2, 16)
    assert_close(own(x, cond), timm_enc(x, cond))
    # the timm model keeps its key names; FiLM adds blocks.{i}.film.*
    assert "blocks.0.norm1.weight" in timm_enc.model.state_dict()
    assert "blocks.0.film.scale.weight" in timm_enc.model.state_dict()


@torch.no_grad()
def test_film_sits_between_attention_and_mlp():
    vit = tiny_vit(depth=1, class_token=False)
    V.add_film(vit, 8)
    x, cond = torch.randn(2, 3, 28, 28), torch.randn(2, 8)
    block = vit.blocks[0]
    h = vit.embed(x)
    h = h + block.ls1(block.attn(block.norm1(h)))
    h = h * (1 + block.film.scale(cond)[:, None]) + block.film.shift(cond)[:, None]
    h = h + block.ls2(block.mlp(block.norm2(h)))
    assert_close(vit(x, cond), vit.norm(h))


@torch.no_grad()
def test_film_condition_is_repeated_per_view():
    vit = V.add_film(tiny_vit(), 16)
    x, cond = torch.randn(2, 3, 3, 28, 28), torch.randn(2, 16)
    out = vit(x, cond)
    assert out.shape == (2, 12, 48)
    assert_close(out[:, 4:8], vit(x[:, 1], cond))


@torch.no_grad()
def test_fused_encoder_film_reaches_every_member():
    fused = V.FusedEncoder([tiny_vit(), tiny_timm_encoder()])
    V.add_film(fused, 16)
    assert all(e.has_film for e in fused.encoders)
    assert fused(torch.randn(1, 6, 28, 28), torch.randn(1, 16)).shape == (1, 4, 96)


def test_condition_errors():
    vit = tiny_vit()
    x = torch.randn(2, 3, 28, 28)
    with pytest.raises(ValueError, match=r"ViT has no FiLM layers, so it takes no condition"):
        vit(x, torch.randn(2, 16))
    V.add_film(vit, 16)
    with pytest.raises(ValueError, match=r"ViT has FiLM layers and needs a condition"):
        vit(x)
    # batch mismatch: our ValueError, or jaxtyping's (b=2 vs f32[3,16]) when checking is on
    with pytest.raises(
        (ValueError, TypeError), match=r"got 3 condition rows for a batch of 2|f32\[3,16\]"
    ):
        vit(x, torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"condition of width 16 .*shape \(2, 8\)"):
        vit(x, torch.randn(2, 8))
    config = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    hf = V.HFVisionEncoder(
        transformers.SiglipVisionModel(config), V.PreprocessConfig(28, (0.5,) * 3, (0.5,) * 3)
    )
    with pytest.raises(TypeError, match="HFVisionEncoder does not support FiLM"):
        V.add_film(hf, 16)
