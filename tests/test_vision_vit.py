"""Own ViT: exact sizes, parity with timm and transformers, truncation, weight loading."""

import pytest
import timm
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vlakit import convert as C
from vlakit import vision as V
from vlakit.core import CheckpointError, load_checked


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@torch.no_grad()
def randomise_norms_and_scales(model: nn.Module) -> None:
    """Move LayerNorm / LayerScale / latent / pos-embed / prefix params off their init, so a
    mapping error in any of them shows up."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(
            model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model, nn.LayerNorm
        ):
            p.copy_((1.0 if leaf == "weight" else 0.0) + 0.3 * torch.randn_like(p))
        elif leaf in ("gamma", "scale_factor"):
            p.copy_(0.5 * torch.randn_like(p))
        elif leaf in ("latent", "probe", "cls_token", "reg_token", "pos_embed"):
            p.copy_(torch.randn_like(p))
        elif "bias" in leaf:
            p.copy_(0.1 * torch.randn_like(p))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- sizes on meta
def test_siglip_so400m_counts_and_keys_match_timm():
    with torch.device("meta"):
        tower = V.siglip_so400m()
        with_head = V.siglip_so400m(map_head=True)
        ref = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False)
    assert n_params(tower) == 412_442_352
    assert n_params(with_head) == 427_680_704 == n_params(ref)
    assert shapes(with_head) == shapes(ref)
    assert tower.dim == 1152 and tower.patches_per_image == 256
    assert tower.preprocessing.mean == (0.5, 0.5, 0.5)


def test_dinov2_large_reg4_counts_and_keys_match_timm():
    with torch.device("meta"):
        tower = V.dinov2_large_reg4()
        ref = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, img_size=224)
    assert n_params(tower) == 303_230_976 == n_params(ref)
    assert shapes(tower) == shapes(ref)
    assert tower.num_prefix_tokens == 5 and tower.patches_per_image == 256
    assert tower.preprocessing.mean == (0.485, 0.456, 0.406)


def test_meta_forward_shapes_full_size():
    with torch.device("meta"):
        fused = V.openvla_fused_encoder()
        out = fused(torch.empty(2, 2, 6, 224, 224))
    assert out.shape == (2, 512, 2176)
    assert fused.dim == 2176 and fused.in_chans == 6 and fused.patches_per_image == 256


# ---------------------------------------------------------------- parity with timm
def tiny_siglip_timm(**kw) -> VisionTransformer:
    kw = dict(
        img_size=28,
        patch_size=14,
        embed_dim=48,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        class_token=False,
        global_pool="map",
        num_classes=0,
        **kw,
    )
    return VisionTransformer(**kw).eval()


def tiny_dinov2_timm(**kw) -> VisionTransformer:
    kw = dict(
        img_size=28,
        patch_size=14,
        embed_dim=48,
        depth=3,
        num_heads=4,
        class_token=True,
        reg_tokens=4,
        no_embed_class=True,
        init_values=1e-5,
        num_classes=0,
        **kw,
    )
    return VisionTransformer(**kw).eval()


@pytest.mark.parametrize("act", [None, "gelu_tanh"])
@torch.no_grad()
def test_from_timm_siglip_family(act):
    ref = tiny_siglip_timm(act_layer=act)
    randomise_norms_and_scales(ref)
    x = torch.randn(2, 3, 28, 28)
    vit = C.vit_from_timm(ref).eval()
    assert vit.blocks[0].mlp.act.approximate == ("tanh" if act else "none")
    tokens = vit(x)
    assert_close(tokens, ref.forward_features(x))
    assert_close(vit.pool(tokens), ref(x))  # MAP head, num_classes=0
    mid = ref.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")[0]
    vit.set_output_layer(1)
    assert_close(vit(x), mid)
    assert not torch.allclose(vit(x), tokens[:, :, :])  # the intermediate differs


@torch.no_grad()
def test_from_timm_dinov2_family_with_prefix_tokens():
    ref = tiny_dinov2_timm()
    randomise_norms_and_scales(ref)
    x = torch.randn(2, 3, 28, 28)
    vit = C.vit_from_timm(ref, output_layer=-2).eval()
    assert vit.num_prefix_tokens == 5 and vit.preprocessing.mean == (0.485, 0.456, 0.406)
    ((mid, prefix),) = ref.get_intermediate_layers(x, n=[1], return_prefix_tokens=True)
    all_tokens = vit.encode(x)
    assert_close(all_tokens[:, :5], prefix)
    assert_close(all_tokens[:, 5:], mid)
    assert_close(vit(x), mid)
    assert_close(vit.encode(x, layer=-1)[:, 5:], ref.forward_features(x)[:, 5:])


@torch.no_grad()
def test_from_timm_classic_vit_pos_embed_covers_class_token():
    ref = VisionTransformer(
        img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4, num_classes=0
    ).eval()
    randomise_norms_and_scales(ref)
    vit = C.vit_from_timm(ref)
    assert vit.pos_embed_prefix and vit.pos_embed.shape == (1, 5, 48)
    x = torch.randn(2, 3, 28, 28)
    assert_close(vit.encode(x), ref.forward_features(x))


@torch.no_grad()
def test_dynamic_img_size_matches_timm():
    ref = tiny_dinov2_timm(dynamic_img_size=True)
    randomise_norms_and_scales(ref)
    vit = C.vit_from_timm(ref)
    x = torch.randn(1, 3, 42, 56)
    assert vit.num_patches((42, 56)) == 12
    assert_close(vit.encode(x), ref.forward_features(x))


def test_from_timm_refuses_unsupported_options():
    # (pre_norm=True, CLIP's, is supported: tests/test_loading.py)
    with pytest.raises(ValueError, match="qk-norm"):
        C.vit_from_timm(
            VisionTransformer(
                img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, qk_norm=True
            )
        )


# ---------------------------------------------------------------- parity with transformers
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


@torch.no_grad()
def test_from_transformers_siglip():
    ref = tiny_hf_siglip()
    randomise_norms_and_scales(ref)
    x = torch.randn(2, 3, 28, 28)
    out = ref(pixel_values=x, output_hidden_states=True)
    vit = C.vit_from_transformers(ref).eval()
    assert vit.blocks[0].mlp.act.approximate == "tanh"
    tokens = vit(x)
    assert_close(tokens, out.last_hidden_state)
    assert_close(vit.pool(tokens), out.pooler_output)
    for layer in (0, 1):
        vit.set_output_layer(layer)
        assert_close(vit(x), out.hidden_states[layer + 1])


def test_transformers_mapping_handles_prefix_and_reports_bad_keys():
    sd = {f"vision_tower.vision_model.{k}": v for k, v in tiny_hf_siglip().state_dict().items()}
    sd["language_model.x"] = torch.zeros(1)  # outside the prefix: ignored
    mapped = C.transformers_siglip_to_vit(sd, prefix="vision_tower.vision_model.")
    assert mapped["blocks.0.attn.qkv.weight"].shape == (144, 48)
    assert mapped["attn_pool.kv.weight"].shape == (96, 48)
    sd["vision_tower.vision_model.encoder.layers.0.self_attn.rope.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.self_attn\.rope\.weight"):
        C.transformers_siglip_to_vit(sd, prefix="vision_tower.vision_model.")


# ---------------------------------------------------------------- truncation
def tiny_vit(**kw) -> V.ViT:
    args = dict(img_size=28, patch_size=14, dim=48, depth=4, num_heads=4, mlp_dim=96)
    return V.vit(**{**args, **kw}).eval()


@torch.no_grad()
def test_output_layer_stops_early_and_truncate_drops_unused_parts():
    vit = tiny_vit(map_head=True, class_token=True, output_layer=-2)
    calls = []
    hooks = [
        b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(vit.blocks)
    ]
    x = torch.randn(2, 3, 28, 28)
    expected = vit(x)
    assert calls == [0, 1, 2]  # block 3 never ran
    for h in hooks:
        h.remove()
    full_state = vit.state_dict()
    before = n_params(vit)
    vit.truncate()
    assert len(vit.blocks) == 3 and isinstance(vit.norm, nn.Identity) and vit.attn_pool is None
    assert n_params(vit) < before
    assert_close(vit(x), expected)
    assert vit.dropped_prefixes == ["blocks.3.", "norm.", "attn_pool."]
    # a full checkpoint still loads: the dropped parts are skipped
    load_checked(vit, full_state)
    with pytest.raises(
        ValueError, match=r"output_layer -1 is block 3, which truncate\(\) removed; blocks 0 to 2"
    ):
        vit.set_output_layer(-1)


def test_output_layer_out_of_range():
    with pytest.raises(
        ValueError, match=r"block index from -4 to 3 \(the encoder has 4 blocks; .*got 4"
    ):
        tiny_vit(output_layer=4)


# ---------------------------------------------------------------- checkpoint errors
def test_load_checked_names_the_offending_key():
    vit = tiny_vit()
    sd = vit.state_dict()
    with pytest.raises(CheckpointError, match="'blocks.9.norm1.weight'"):
        load_checked(vit, {**sd, "blocks.9.norm1.weight": torch.zeros(48)})
    missing = dict(sd)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match="'blocks.1.mlp.fc2.bias'"):
        load_checked(vit, missing)
    with pytest.raises(
        CheckpointError, match=r"'pos_embed' has shape \(1, 9, 48\), expected \(1, 4, 48\)"
    ):
        load_checked(vit, {**sd, "pos_embed": torch.zeros(1, 9, 48)})
    with pytest.raises(CheckpointError, match="'blocks.0.attn.qkv.scale'"):
        C.timm_to_vit({**sd, "blocks.0.attn.qkv.scale": torch.zeros(1)})


# ---------------------------------------------------------------- OpenVLA naming
def openvla_state_dict(dino: V.ViT, siglip: V.ViT, film: bool = False) -> dict:
    """Write the two towers' weights with OpenVLA's key names (and other model keys)."""
    sd = {}
    for tower, vit in (("featurizer", dino), ("fused_featurizer", siglip)):
        for key, value in vit.state_dict().items():
            key = key.replace(".gamma", ".scale_factor")
            if film and key.startswith("blocks."):
                i, rest = key.split(".", 2)[1:]
                key = (
                    f"blocks.{i}.{rest.replace('film.', '')}"
                    if rest.startswith("film.")
                    else f"blocks.{i}.block.{rest}"
                )
            sd[f"vision_backbone.{tower}.{key}"] = value.clone()
    sd["projector.fc1.weight"] = torch.zeros(4, 96)
    sd["language_model.model.embed_tokens.weight"] = torch.zeros(10, 4)
    return sd


def tiny_openvla_pair(**kw) -> tuple[V.ViT, V.ViT]:
    dino = tiny_vit(layer_scale_init=1e-5, class_token=True, reg_tokens=4, depth=3, **kw)
    siglip = tiny_vit(gelu_approximate="tanh", depth=3, **kw)
    return dino, siglip


@torch.no_grad()
def test_openvla_vision_mapping_loads_into_a_truncated_pair():
    src_dino, src_siglip = tiny_openvla_pair(output_layer=-2)
    src_siglip_full = tiny_vit(gelu_approximate="tanh", depth=3, map_head=True, output_layer=-2)
    src_siglip_full.load_state_dict(src_siglip.state_dict(), strict=False)
    for vit in (src_dino, src_siglip_full):
        randomise_norms_and_scales(vit)
    sd = openvla_state_dict(src_dino, src_siglip_full)
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in sd
    assert "vision_backbone.fused_featurizer.attn_pool.latent" in sd

    dino, siglip = tiny_openvla_pair(output_layer=-2)
    dino.truncate()
    siglip.truncate()
    C.load_openvla_vision(dino, siglip, sd)
    fused = V.FusedEncoder([dino, siglip])
    x = torch.randn(2, 6, 28, 28)
    expected = torch.cat([src_dino(x[:, :3]), src_siglip_full(x[:, 3:])], dim=-1)
    assert_close(fused(x), expected)


def test_openvla_mapping_errors_name_the_key():
    dino, siglip = tiny_openvla_pair()
    sd = openvla_state_dict(dino, siglip)
    bad = {**sd, "vision_backbone.extra_tower.w": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="'vision_backbone.extra_tower.w'"):
        C.openvla_vision_state_dicts(bad)
    bad = {**sd, "vision_backbone.featurizer.blocks.0.ls3.scale_factor": torch.zeros(48)}
    with pytest.raises(CheckpointError, match="'blocks.0.ls3.scale_factor'"):
        C.openvla_vision_state_dicts(bad)
    # a tower with a shallower depth than the checkpoint: unexpected key named
    shallow_dino, shallow_siglip = (
        tiny_vit(depth=2, layer_scale_init=1e-5, class_token=True, reg_tokens=4),
        tiny_vit(depth=3, gelu_approximate="tanh"),
    )
    with pytest.raises(CheckpointError, match="'blocks.2.norm1.weight'"):
        C.load_openvla_vision(shallow_dino, shallow_siglip, sd)


@torch.no_grad()
def test_openvla_oft_film_keys_map_onto_film_blocks():
    dino, siglip = tiny_openvla_pair()
    for vit in (dino, siglip):
        vit.add_film(cond_dim=16)
    sd = openvla_state_dict(dino, siglip, film=True)
    assert "vision_backbone.featurizer.blocks.0.block.norm1.weight" in sd
    assert "vision_backbone.featurizer.blocks.0.scale.weight" in sd
    new_dino, new_siglip = tiny_openvla_pair()
    for vit in (new_dino, new_siglip):
        vit.add_film(cond_dim=16)
    C.load_openvla_vision(new_dino, new_siglip, sd)
    x, c = torch.randn(1, 3, 28, 28), torch.randn(1, 16)
    assert_close(new_dino(x, c), dino(x, c))
