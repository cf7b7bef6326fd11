"""Vision blocks receive their linear layers, initialise from the meta device, and every
encoder says whether it takes a FiLM condition."""

import pytest
import torch
import transformers
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vlakit import vision as V
from vlakit.core import init_parameters

TINY = dict(img_size=28, patch_size=14, dim=48, depth=2, num_heads=4, mlp_dim=96)


class TaggedLinear(nn.Linear):
    """A linear layer of its own type, standing for a LoRA / quantised / FP8 linear."""


def counting_factory(calls: list):
    def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        calls.append((in_features, out_features, bias))
        return TaggedLinear(in_features, out_features, bias=bias)

    return linear


# ---------------------------------------------------------------- linear factory
def test_every_projection_comes_from_the_linear_factory():
    calls: list = []
    vit = V.vit(**TINY, qkv_bias=False, map_head=True, linear=counting_factory(calls))
    linears = {name: m for name, m in vit.named_modules() if isinstance(m, nn.Linear)}
    assert linears and all(type(m) is TaggedLinear for m in linears.values())
    # names kept, so PEFT-style targeting by name works
    leaves = {name.rsplit(".", 1)[-1] for name in linears}
    assert leaves == {"qkv", "proj", "fc1", "fc2", "q", "kv"}
    assert "blocks.0.attn.qkv" in linears and "attn_pool.kv" in linears
    # depth × (qkv, proj, fc1, fc2) + head (q, kv, proj, fc1, fc2)
    assert len(calls) == len(linears) == 2 * 4 + 5
    assert (48, 144, False) in calls  # qkv_bias=False reaches the factory
    assert vit.blocks[0].attn.qkv.bias is None and vit.blocks[0].attn.proj.bias is not None
    # FiLM projections too
    V.add_film(vit, 16, linear=counting_factory(calls))
    assert type(vit.blocks[1].film.scale) is TaggedLinear
    assert type(vit.blocks[1].film.shift) is TaggedLinear


@torch.no_grad()
def test_linear_factory_leaves_numbers_unchanged():
    x = torch.randn(2, 3, 28, 28)
    torch.manual_seed(1)
    default = V.vit(**TINY, map_head=True, class_token=True).eval()
    torch.manual_seed(1)
    plain = V.vit(**TINY, map_head=True, class_token=True, linear=nn.Linear).eval()
    torch.manual_seed(1)
    tagged = V.vit(**TINY, map_head=True, class_token=True, linear=counting_factory([])).eval()
    for other in (plain, tagged):
        assert default.state_dict().keys() == other.state_dict().keys()
        for key, value in default.state_dict().items():
            assert torch.equal(value, other.state_dict()[key]), key
        assert torch.equal(other(x), default(x))
        assert torch.equal(other.pool(other(x)), default.pool(default(x)))


def test_named_builders_pass_the_factory_through():
    with torch.device("meta"):
        for build in (V.siglip_so400m, V.dinov2_large_reg4, V.openvla_fused_encoder):
            model = build(linear=TaggedLinear)
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            assert linears and all(type(m) is TaggedLinear for m in linears), build.__name__


# ---------------------------------------------------------------- meta-device init
def tiny_builds() -> dict:
    """Every vision builder at tiny size, with every option that owns parameters."""
    return {
        "vit": lambda: V.vit(**TINY),
        "vit_prefix_ls_map": lambda: V.vit(
            **TINY, class_token=True, reg_tokens=4, layer_scale_init=0.25, map_head=True,
            pos_embed_prefix=True,
        ),
        "vit_film": lambda: V.add_film(V.vit(**TINY, layer_scale_init=1e-5), 16),
        "vit_film_zero": lambda: V.add_film(V.vit(**TINY), 16, zero_init=True),
        "fused": lambda: V.FusedEncoder([
            V.vit(**TINY, class_token=True, reg_tokens=4, layer_scale_init=1e-5, output_layer=-2),
            V.vit(**TINY, gelu_approximate="tanh", map_head=True, output_layer=-2),
        ]),
        "timm": lambda: V.TimmEncoder(VisionTransformer(
            img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4, num_classes=0,
            reg_tokens=2, no_embed_class=True, init_values=0.5, global_pool="map",
        )),
    }


@pytest.mark.parametrize("name", list(tiny_builds()))
@torch.no_grad()
def test_meta_build_initialises_every_parameter(name):
    build = tiny_builds()[name]
    with torch.device("meta"):
        meta = build()
    meta.to_empty(device="cpu")
    for p in meta.parameters():
        p.fill_(float("nan"))  # what to_empty left must all be overwritten
    torch.manual_seed(5)
    init_parameters(meta)
    # the same initialisation run on a CPU build: equal only if every parameter was reset
    cpu = build()
    torch.manual_seed(5)
    init_parameters(cpu)
    for key, value in meta.state_dict().items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, cpu.state_dict()[key]), key
    # the deterministic ones take their documented values
    for module in meta.modules():
        if isinstance(module, V.LayerScale):
            assert torch.equal(module.gamma, torch.full_like(module.gamma, module.init_value))
        if isinstance(module, V.FiLM) and name == "vit_film_zero":
            assert not module.scale.weight.any() and not module.shift.bias.any()
    # the random ones have the spread of a direct CPU build (timm's conventions)
    if name == "vit_prefix_ls_map":
        assert meta.cls_token.abs().max() < 1e-4 and meta.reg_token.abs().max() < 1e-4
        assert 0.01 < meta.pos_embed.std() < 0.03
        assert 0.05 < meta.attn_pool.latent.std() < 0.3  # dim ** -0.5 = 0.144


def test_full_size_builders_leave_no_parameter_without_a_reset():
    with torch.device("meta"):
        models = [V.siglip_so400m(map_head=True), V.dinov2_large_reg4(),
                  V.openvla_fused_encoder(), V.add_film(V.openvla_fused_encoder(), 4096)]
    for model in models:
        for name, module in model.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                assert callable(getattr(module, "reset_parameters", None)), (
                    f"{type(model).__name__}.{name} ({type(module).__name__}) owns parameters "
                    "but has no reset_parameters"
                )


# ---------------------------------------------------------------- has_film / condition
def all_encoders() -> dict:
    clip_cfg = CLIPVisionCfg(layers=2, width=48, head_width=16, patch_size=14, image_size=28)
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=14,
    )
    return {
        "vit": V.vit(**TINY),
        "timm": V.TimmEncoder(VisionTransformer(
            img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4, num_classes=0)),
        "open_clip": V.OpenClipEncoder(_build_vision_tower(32, clip_cfg)),
        "hf": V.HFVisionEncoder(
            transformers.SiglipVisionModel(hf_cfg), V.PreprocessConfig(28, (0.5,) * 3, (0.5,) * 3)
        ),
        "fused": V.FusedEncoder([V.vit(**TINY), V.vit(**TINY)]),
    }


@pytest.mark.parametrize("name", ["vit", "timm", "open_clip", "hf", "fused"])
@torch.no_grad()
def test_every_encoder_has_film_and_refuses_a_stray_condition(name):
    enc = all_encoders()[name].eval()
    x, cond = torch.randn(2, 3 * (2 if name == "fused" else 1), 28, 28), torch.randn(2, 16)
    assert enc.has_film is False
    with pytest.raises(ValueError, match="has no FiLM layers, so it takes no condition"):
        enc(x, cond)
    if name in ("open_clip", "hf"):
        with pytest.raises(TypeError, match="FiLM"):
            V.add_film(enc, 16)
        assert enc.has_film is False
        return
    V.add_film(enc, 16)
    assert enc.has_film is True
    with pytest.raises(ValueError, match="has FiLM layers and needs a condition"):
        enc(x)
    assert enc(x, cond).shape == (2, 4, enc.dim)


@torch.no_grad()
def test_fused_encoder_passes_the_condition_to_its_film_members_only():
    plain, conditioned = V.vit(**TINY).eval(), V.add_film(V.vit(**TINY), 16).eval()
    fused = V.FusedEncoder([plain, conditioned]).eval()
    assert fused.has_film
    x, cond = torch.randn(2, 6, 28, 28), torch.randn(2, 16)
    expected = torch.cat([plain(x[:, :3]), conditioned(x[:, 3:], cond)], dim=-1)
    torch.testing.assert_close(fused(x, cond), expected)
    # views: the condition is repeated per view
    views = torch.randn(2, 2, 6, 28, 28)
    out = fused(views, cond)
    torch.testing.assert_close(out[:, 4:], fused(views[:, 1], cond))
    with pytest.raises(ValueError, match="FusedEncoder has FiLM layers and needs a condition"):
        fused(x)
