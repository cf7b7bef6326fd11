"""Checkpoint files in, strictly: PaliGemma directories in every layout (written here by
transformers' own save_pretrained, or with the Hub's key names), sharded indexes, dtype
conversion, loading into meta-built models, torch pickles only as weights, the
Prismatic LayerScale name, and every bad input with a clear error."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from test_continuous_heads import _inputs, _model  # noqa: E402
from test_paligemma import EOS, _rows, _tiny_hf  # noqa: E402

from vlakit.convert import (  # noqa: E402
    CheckpointFiles,
    load_into,
    read_torch_weights,
    strip_prefix,
    vit_from_timm,
)
from vlakit.core import CheckpointError, building  # noqa: E402
from vlakit.model import VLAInputs  # noqa: E402
from vlakit.models import load_paligemma  # noqa: E402


def _logits(model, hf=None):
    ids, tt, valid = _rows([[10, 11, 12], [20, 21]], [[30, 31, 32, EOS], [40, EOS]])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if hf is not None:
            positions = (valid.long().cumsum(-1) - 1).clamp_min(0) + 1
            out = hf(input_ids=ids, pixel_values=pixels, attention_mask=valid.long(),
                     token_type_ids=tt, position_ids=positions).logits
        else:
            out = model.eval()(VLAInputs(input_ids=ids, text_valid=valid,
                                         pixels=pixels[:, None], token_type_ids=tt),
                               return_logits=True).logits
    return out[valid]


@pytest.fixture(scope="module")
def hf_paligemma():
    torch.manual_seed(0)
    return _tiny_hf()


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_paligemma_from_save_pretrained_gives_transformers_logits(hf_paligemma, tmp_path,
                                                                       shard):
    kwargs = {} if shard is None else {"max_shard_size": shard}
    hf_paligemma.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    model, report = load_paligemma(tmp_path, return_report=True)
    # every model tensor loaded, nothing stored left over (a missing or unexpected key raises)
    assert report.loaded == len(model.state_dict()) and not report.skipped
    assert len(CheckpointFiles(tmp_path)) == len(hf_paligemma.state_dict()) - 1  # tied head
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    torch.testing.assert_close(_logits(model), _logits(None, hf_paligemma), atol=1e-4, rtol=0)


def _write_layout(hf, directory, rename, extra=None):
    """Save ``hf``'s weights with keys renamed by ``rename`` (and ``extra`` tensors)."""
    directory.mkdir()
    hf.save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    state = {rename(k): v for k, v in state.items()}
    state.update(extra or {})
    save_file(state, directory / "model.safetensors")
    return state


def test_hub_and_module_name_layouts_load(hf_paligemma, tmp_path):
    def hub(key):  # vision_tower.vision_model.*, language_model.model.* (as on the Hub)
        return key.replace("vision_tower.", "vision_tower.vision_model.", 1)

    state = _write_layout(hf_paligemma, tmp_path / "hub", hub)
    embed = state["language_model.model.embed_tokens.weight"]
    save_file({**state, "language_model.lm_head.weight": embed.clone()},
              tmp_path / "hub" / "model.safetensors")
    model, report = load_paligemma(tmp_path / "hub", return_report=True)
    assert report.skipped == ["language_model.lm_head.weight"]  # tied: equal, not loaded
    expected = _logits(None, hf_paligemma)
    torch.testing.assert_close(_logits(model), expected, atol=1e-4, rtol=0)

    def modules(key):  # transformers 5.x module names
        key = key.replace("language_model.model.", "language_model.", 1)
        return "model." + key

    _write_layout(hf_paligemma, tmp_path / "modules", modules)
    torch.testing.assert_close(_logits(load_paligemma(tmp_path / "modules")), expected,
                               atol=1e-4, rtol=0)


def test_a_bf16_checkpoint_into_fp32_is_converted_and_said(hf_paligemma, tmp_path):
    hf_paligemma.to(torch.bfloat16).save_pretrained(tmp_path)
    hf_paligemma.to(torch.float32)
    model, report = load_paligemma(tmp_path, return_report=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert report.cast == {"bfloat16 -> float32": report.loaded}
    assert "cast" in str(report)
    bf16 = load_paligemma(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_load_paligemma_builds_for_one_view(hf_paligemma, tmp_path):
    hf_paligemma.save_pretrained(tmp_path)
    model = load_paligemma(tmp_path).eval()
    assert model.num_views == 1
    ids, tt, valid = _rows([[10, 11, 12]], [[30, EOS]])
    two = VLAInputs(input_ids=ids, text_valid=valid, token_type_ids=tt,
                    pixels=torch.randn(1, 2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"built for 1 camera view\(s\) per example but "
                                         r"inputs\.pixels has 2"):
        model(two, return_logits=True)


# -- bad input -------------------------------------------------------------------------------

def test_truncated_or_corrupt_safetensors_names_the_file(hf_paligemma, tmp_path):
    hf_paligemma.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable"):
        load_paligemma(tmp_path)
    file.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        CheckpointFiles(file)


def test_an_index_pointing_to_a_missing_shard_names_it(hf_paligemma, tmp_path):
    hf_paligemma.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"to shard {shard}, which is not in"):
        load_paligemma(tmp_path)


def test_a_config_for_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="describes a 'llama' model, not PaliGemma"):
        load_paligemma(tmp_path)
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_paligemma(tmp_path / "nowhere")


def test_shape_mismatch_and_unknown_keys_are_reported_together(hf_paligemma, tmp_path):
    key = "multi_modal_projector.linear.weight"
    state = _write_layout(hf_paligemma, tmp_path / "bad", lambda k: k)
    state[key] = torch.zeros(3, 3)
    state["language_model.model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"matches no rename rule"):
        load_paligemma(tmp_path / "bad")
    del state["language_model.model.layers.0.mlp.extra.weight"]
    save_file(state, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped 1 .*projector\.linear\.weight \(3, 3\)"):
        load_paligemma(tmp_path / "bad")


def test_load_into_reports_all_three_kinds_and_leaves_the_model_untouched():
    model = _model("l1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(model.state_dict())
    state.pop("projector.linear.weight")
    state["projector.linear.extra"] = torch.zeros(1)
    state["head.model.fc2.bias"] = torch.zeros(5)
    state["encoder.pos_embed"] = state["encoder.pos_embed"] + 1  # a value change, not loaded
    with pytest.raises(CheckpointError) as error:
        load_into(model, state)
    message = str(error.value)
    assert "missing 1: 'projector.linear.weight'" in message
    assert "unexpected 1: 'projector.linear.extra'" in message
    assert "mis-shaped 1 (stored vs model): 'head.model.fc2.bias (5,) vs (3,)'" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_integer_weights_into_a_float_model_are_refused():
    model = _model("l1")
    state = dict(model.state_dict())
    state["projector.linear.weight"] = state["projector.linear.weight"].to(torch.int8)
    with pytest.raises(CheckpointError, match="stored as torch.int8.*quantised"):
        load_into(model, state)


# -- meta-built models -----------------------------------------------------------------------

def test_load_state_dict_into_a_meta_built_model_fills_it():
    """The trap: build on meta, load a block's weights, predict. torch alone copies into
    meta (a silent no-op); a VLA's blocks take the stored tensors instead."""
    real = _model("l1")
    with building(None, "meta"):
        meta = _model("l1")
    bf16 = {k: v.to(torch.bfloat16) for k, v in real.projector.state_dict().items()}
    meta.projector.load_state_dict(bf16)  # one block, a bf16 state dict
    weight = meta.projector.linear.weight
    assert weight.device.type == "cpu" and weight.dtype == torch.float32
    assert torch.equal(weight, real.projector.linear.weight.to(torch.bfloat16).float())
    meta.load_state_dict(real.state_dict())  # the rest
    assert not any(p.is_meta for p in meta.parameters())
    inputs = _inputs(actions=False)
    torch.testing.assert_close(meta.eval().predict_action(inputs),
                               real.eval().predict_action(inputs))
    with building(None, "meta"):
        meta = _model("l1")
    ints = {k: v.to(torch.int8) for k, v in real.projector.state_dict().items()}
    with pytest.raises(CheckpointError, match="quantised"):
        meta.projector.load_state_dict(ints)


def test_load_into_a_meta_model_assigns_without_a_second_copy(tmp_path):
    real = _model("l1")
    save_file({k: v.contiguous() for k, v in real.state_dict().items()},
              tmp_path / "model.safetensors")
    with building(None, "meta"):
        meta = _model("l1")
    with CheckpointFiles(tmp_path) as files:
        report = load_into(meta, files)
    assert report.loaded == len(real.state_dict()) and not report.cast
    for key, value in meta.state_dict().items():
        assert torch.equal(value, real.state_dict()[key]), key


# -- torch pickles and timm towers ------------------------------------------------------------

class _NotATensor:
    pass


def test_torch_pickles_are_read_as_weights_only(tmp_path):
    torch.save({"module.fc1.weight": torch.ones(2, 2)}, tmp_path / "head.pt")
    state = strip_prefix(read_torch_weights(tmp_path / "head.pt"), "module.")
    assert list(state) == ["fc1.weight"] and torch.equal(state["fc1.weight"], torch.ones(2, 2))
    torch.save({"payload": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_torch_weights(tmp_path / "evil.pt")


def test_vit_from_timm_accepts_prismatic_layer_scale_names():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4,
                              num_classes=0, class_token=True, reg_tokens=4,
                              no_embed_class=True, init_values=0.5).eval()
    x = torch.randn(1, 3, 28, 28)
    expected = vit_from_timm(tower).eval()(x)  # timm's own LayerScale names
    for block in tower.blocks:  # OpenVLA's patch: LayerScale holds `scale_factor`
        for ls in (block.ls1, block.ls2):
            ls.scale_factor = nn.Parameter(ls.gamma.detach().clone())
            del ls.gamma
            ls.forward = (lambda self: lambda t: t * self.scale_factor)(ls)
    assert "blocks.0.ls1.scale_factor" in tower.state_dict()
    own = vit_from_timm(tower).eval()
    torch.testing.assert_close(own(x), expected, rtol=0, atol=0)
    assert torch.equal(own.blocks[0].ls1.gamma, tower.blocks[0].ls1.scale_factor)


# -- timm and open_clip towers onto the own ViT ------------------------------------------------

def test_open_clip_siglip_trunk_weights_map_onto_the_own_vit():
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    from vlakit.convert import open_clip_to_vit, timm_vit_spec
    from vlakit.vision import vit

    torch.manual_seed(0)
    cfg = CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_pool="map",
                        timm_proj="none", image_size=224)
    visual = _build_vision_tower(32, cfg).eval()
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}  # open_clip names
    state.update({"logit_scale": torch.ones(()), "text.token_embedding.weight":
                  torch.zeros(4, 4)})
    own = vit(**timm_vit_spec(visual.trunk))
    own.load_state_dict(open_clip_to_vit(state))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(own(x), vit_from_timm(visual.trunk)(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="no open_clip timm trunk keys"):
        open_clip_to_vit({"visual.transformer.resblocks.0.ln_1.weight": torch.ones(1)})


def test_pali_pt_gap_towers_convert_from_timm():
    """timm's PaliGemma-trained towers (``vit_so400m_patch14_siglip_gap_*.pali_pt``): no
    class token, average pooling, no MAP head; tiny, with their real key names."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4,
                              mlp_ratio=2, class_token=False, global_pool="avg",
                              fc_norm=False, num_classes=0, act_layer="gelu_tanh").eval()
    assert not any(k.startswith(("attn_pool", "cls_token")) for k in tower.state_dict())
    own = vit_from_timm(tower).eval()
    assert own.attn_pool is None and own.cls_token is None
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(own(x), tower.forward_features(x), atol=1e-6, rtol=0)


def test_clip_towers_with_pre_norm_and_quick_gelu_convert_from_timm():
    """OpenAI CLIP as timm builds it (Prismatic's ``clip`` backbones): a LayerNorm before
    the blocks, no patch-embedding bias, a class token, QuickGELU."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4,
                              mlp_ratio=2, class_token=True, pre_norm=True,
                              act_layer="quick_gelu", num_classes=0, norm_layer=nn.LayerNorm)
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    tower.eval()
    assert "norm_pre.weight" in tower.state_dict()
    assert "patch_embed.proj.bias" not in tower.state_dict()
    own = vit_from_timm(tower).eval()
    assert own.patch_embed.proj.bias is None
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(own.encode(x), tower.forward_features(x), atol=1e-5, rtol=0)


def test_a_corrupt_torch_file_names_itself(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "head.pt")
    data = (tmp_path / "head.pt").read_bytes()
    (tmp_path / "head.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"head\.pt could not be read"):
        read_torch_weights(tmp_path / "head.pt")
