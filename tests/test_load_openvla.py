"""load_openvla on a directory the test writes in the published layout: config.json of
OpenVLAConfig (timm ids of two tiny towers registered here), sharded safetensors with the
released key names (Prismatic's LayerScale ``scale_factor``), dataset_statistics.json and
preprocessor_config.json. Outputs equal the published algorithm on the same weights."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from transformers import LlamaConfig, LlamaForCausalLM

from vlakit.core import CheckpointError
from vlakit.model import VLAInputs
from vlakit.models import load_openvla


@register_model
def vlakit_test_dino_reg4(pretrained=False, **kwargs):
    args = dict(patch_size=14, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2,
                class_token=True, reg_tokens=4, no_embed_class=True, init_values=0.5)
    return _tower(args, kwargs)


def _tower(args, kwargs):
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm's registry passes these to every builder
    tower = VisionTransformer(**{**args, **kwargs})
    tower.pretrained_cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                            "interpolation": "bicubic", "input_size": (3, 28, 28)}
    return tower


@register_model
def vlakit_test_siglip(pretrained=False, **kwargs):
    args = dict(patch_size=14, embed_dim=40, depth=3, num_heads=4, mlp_ratio=2,
                class_token=False, global_pool="map")
    return _tower(args, kwargs)


TEXT = dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, pad_token_id=320)  # rms_norm_eps: transformers'
CONFIG_STATS = {"bridge": {"action": {"q01": [-1.0] * 3, "q99": [1.0] * 3,
                                      "mask": [True, True, False]}}}
FINETUNED = {"libero": {"action": {"q01": [-0.5, 0.0, -2.0], "q99": [0.5, 1.0, 2.0],
                                   "mask": [True, True, False]}}}
MEANS = [[0.484375, 0.455078125, 0.40625], [0.5, 0.5, 0.5]]  # bf16-rounded, as released
STDS = [[0.228515625, 0.2236328125, 0.224609375], [0.5, 0.5, 0.5]]


def _parts():
    import timm

    torch.manual_seed(0)
    dino = timm.create_model("vlakit_test_dino_reg4", num_classes=0, img_size=28).eval()
    siglip = timm.create_model("vlakit_test_siglip", num_classes=0, img_size=28).eval()
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TEXT.items()
                                            if k != "model_type"})).eval()
    projector = {"fc1": torch.nn.Linear(72, 288), "fc2": torch.nn.Linear(288, 64),
                 "fc3": torch.nn.Linear(64, 64)}
    return dino, siglip, llama, projector


def _write(directory, dino, siglip, llama, projector, config=None):
    state = {}
    for key, value in dino.state_dict().items():
        key = key.replace(".gamma", ".scale_factor")  # Prismatic's LayerScale patch
        state[f"vision_backbone.featurizer.{key}"] = value
    for key, value in siglip.state_dict().items():
        state[f"vision_backbone.fused_featurizer.{key}"] = value
    for name, layer in projector.items():
        state[f"projector.{name}.weight"] = layer.weight.detach()
        state[f"projector.{name}.bias"] = layer.bias.detach()
    for key, value in llama.state_dict().items():
        state[f"language_model.{key}"] = value
    state = {k: v.detach().contiguous().to(torch.bfloat16) for k, v in state.items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, directory / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config or {
        "model_type": "openvla", "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure", "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True, "image_resize_strategy": "resize-naive",
        "timm_model_ids": ["vlakit_test_dino_reg4", "vlakit_test_siglip"],
        "timm_override_act_layers": [None, None], "image_sizes": [28, 28],
        "text_config": TEXT, "n_action_bins": 256, "pad_to_multiple_of": 64,
        "norm_stats": CONFIG_STATS,
    }))
    (directory / "dataset_statistics.json").write_text(json.dumps(FINETUNED))
    (directory / "preprocessor_config.json").write_text(json.dumps({"means": MEANS,
                                                                    "stds": STDS}))
    return state


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    directory = tmp_path_factory.mktemp("openvla")
    parts = _parts()
    state = _write(directory, *parts)
    return directory, parts, state


def _reference_logits(parts, state, pixels, ids):
    """The published algorithm on the bf16-stored weights (cast back to fp32)."""
    dino, siglip, llama, projector = (p for p in parts)
    dino, siglip, llama = (m.float() for m in (dino, siglip, llama))
    with torch.no_grad():
        for prefix, module in (("vision_backbone.featurizer.", dino),
                               ("vision_backbone.fused_featurizer.", siglip),
                               ("language_model.", llama)):
            own = {k[len(prefix):].replace(".scale_factor", ".gamma"): v.float()
                   for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(own)
        fc = {n: (state[f"projector.{n}.weight"].float(), state[f"projector.{n}.bias"].float())
              for n in ("fc1", "fc2", "fc3")}
        f1 = dino.get_intermediate_layers(pixels[:, :3], n={len(dino.blocks) - 2})[0]
        f2 = siglip.get_intermediate_layers(pixels[:, 3:], n={len(siglip.blocks) - 2})[0]
        x = torch.cat([f1, f2], -1)
        x = F.linear(F.gelu(F.linear(F.gelu(F.linear(x, *fc["fc1"])), *fc["fc2"])), *fc["fc3"])
        embed = llama.get_input_embeddings()(torch.cat([torch.tensor([[1]]), ids], 1))
        embeds = torch.cat([embed[:, :1], x, embed[:, 1:]], 1)
        return llama(inputs_embeds=embeds).logits[0]


def test_load_openvla_gives_the_published_algorithms_logits(written):
    directory, parts, state = written
    model, report = load_openvla(directory, return_report=True)
    # the parts the forward never uses: each tower's last block and final norm, the pool
    skipped = set(report.skipped)
    assert "encoder.encoders.0.blocks.2.attn.qkv.weight" in skipped
    assert {"encoder.encoders.0.norm.weight", "encoder.encoders.1.attn_pool.latent"} <= skipped
    assert not any(".blocks.1." in k for k in skipped)
    statistics = len(model.action_normalizer.state_dict())  # from dataset_statistics.json
    assert report.cast == {"bfloat16 -> float32": report.loaded - statistics}
    assert report.loaded - statistics + len(skipped) == len(state)  # every stored tensor
    assert model.decoder.layers[0].attn_norm.eps == 1e-6  # transformers' default, as released
    assert model.encoder.encoders[0].preprocessing.mean == tuple(MEANS[0])
    ids = torch.tensor([[10, 11, 12, 13]])
    pixels = torch.randn(1, 6, 28, 28)
    with torch.no_grad():
        out = model.eval()(VLAInputs(input_ids=ids, text_valid=ids > 0, pixels=pixels[:, None]),
                           return_logits=True)
    expected = _reference_logits(parts, state, pixels, ids)
    torch.testing.assert_close(out.logits[0], expected, atol=1e-4, rtol=0)


def test_load_openvla_takes_the_finetuned_statistics_and_the_vocabulary(written):
    directory, _, _ = written
    model = load_openvla(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.head.tokenizer.vocab_end == 384 - 64
    assert model.action_normalizer.dim == 3
    assert torch.equal(model.action_normalizer.low.float(), torch.tensor([-0.5, 0.0, -2.0]))
    actions = model.eval().predict_action(VLAInputs(
        input_ids=torch.tensor([[10, 11]]), text_valid=torch.ones(1, 2, dtype=torch.bool),
        pixels=torch.randn(1, 1, 6, 28, 28)))
    assert actions.shape == (1, 1, 3)


def test_load_openvla_builds_for_one_view(written):
    directory, _, _ = written
    model = load_openvla(directory).eval()
    assert model.num_views == 1
    ids = torch.tensor([[10, 11]])
    two = VLAInputs(input_ids=ids, text_valid=ids > 0, pixels=torch.randn(1, 2, 6, 28, 28))
    with pytest.raises(ValueError, match=r"built for 1 camera view\(s\) per example but "
                                         r"inputs\.pixels has 2"):
        model(two, return_logits=True)


def test_load_openvla_bad_directories_and_activation_overrides(written, tmp_path):
    directory, parts, _ = written
    config = json.loads((directory / "config.json").read_text())
    bad = tmp_path / "unknown_tower"
    bad.mkdir()
    _write(bad, *parts, config={**config, "timm_model_ids": ["no_such_vit", "vlakit_test_siglip"]})
    with pytest.raises(CheckpointError, match="timm does not know the vision tower 'no_such_vit'"):
        load_openvla(bad)
    quick = tmp_path / "quick_gelu"
    quick.mkdir()
    _write(quick, *parts, config={**config, "timm_override_act_layers": ["quick_gelu", None]})
    clip_like = load_openvla(quick)  # CLIP's override reaches timm, and the own ViT follows
    assert type(clip_like.encoder.encoders[0].blocks[0].mlp.act).__name__ == "QuickGELU"
    several = tmp_path / "several"
    several.mkdir()
    _write(several, *parts)
    (several / "dataset_statistics.json").write_text(json.dumps({**FINETUNED, **CONFIG_STATS}))
    with pytest.raises(ValueError, match=r"pass unnorm_key, one of \['bridge', 'libero'\]"):
        load_openvla(several)
    assert load_openvla(several, unnorm_key="bridge").action_normalizer.dim == 3


# -- OpenVLA-OFT and LightVLA run directories -------------------------------------------------

def _film_keys(state, tower, d_vision, d_llm, g):
    """OFT's FiLM-wrapped blocks: ``blocks.{i}.block.*`` and ``blocks.{i}.{scale,shift}.*``."""
    out = {}
    prefix = f"vision_backbone.{tower}.blocks."
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            out[f"{prefix}{index}.block.{rest}"] = value
            for name in ("scale", "shift"):
                out[f"{prefix}{index}.{name}.weight"] = torch.randn(d_vision, d_llm, generator=g)
                out[f"{prefix}{index}.{name}.bias"] = torch.randn(d_vision, generator=g)
        else:
            out[key] = value
    return out


_LINEAR = re.compile(r".*\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight")


def _write_oft(directory, parts, head="l1", rank=4):
    """An OFT run folder as OFT writes it: merged model.safetensors (its vision towers
    without FiLM), the head and proprio files, and for FiLM the whole vision backbone of its
    peft model in ``vision_backbone--*_checkpoint.pt`` (every linear a LoRA layer:
    ``base_layer`` + ``lora_A/B.default``; FiLM's scale/shift plain). Returns the vision
    weights in effect (base + min(r, 16)/r * B A), the head and the proprio projector."""
    from vlakit.heads import DiffusionActionHead, L1RegressionHead
    from vlakit.projectors import ProprioProjector

    state = _write(directory, *parts)
    g = torch.Generator().manual_seed(3)
    film = _film_keys(state, "featurizer", 32, 64, g)
    film = _film_keys(film, "fused_featurizer", 40, 64, g)
    vision, effective = {}, {}
    for key, value in film.items():
        if not key.startswith("vision_backbone."):
            continue
        value = value.float()
        name = key[len("vision_backbone."):]
        linear = _LINEAR.fullmatch(key.replace(".bias", ".weight")) and ".block." in key
        if linear and key.endswith(".weight"):
            module = name[: -len(".weight")]
            a = torch.randn(rank, value.shape[1], generator=g).to(torch.bfloat16)
            b = torch.randn(value.shape[0], rank, generator=g).to(torch.bfloat16)
            base = value.to(torch.bfloat16)
            vision[f"{module}.base_layer.weight"] = base
            vision[f"{module}.lora_A.default.weight"] = a
            vision[f"{module}.lora_B.default.weight"] = b
            merged = base.float() + (min(rank, 16) / rank) * (b.float() @ a.float())
            effective[key] = merged.to(torch.bfloat16).float()
        elif linear:  # a LoRA layer's bias stays its base layer's
            vision[name.replace(".bias", ".base_layer.bias")] = value.to(torch.bfloat16)
            effective[key] = value.to(torch.bfloat16).float()
        else:
            vision[name] = value.to(torch.bfloat16)
            effective[key] = value.to(torch.bfloat16).float()
    torch.save(vision, directory / "vision_backbone--100_checkpoint.pt")
    torch.manual_seed(4)
    action_head = (L1RegressionHead(64, 3, 8) if head == "l1"
                   else DiffusionActionHead(64, 3, 8, num_inference_steps=2))
    head_state = {f"module.{k}": v for k, v in action_head.state_dict().items()
                  if not k.startswith("noisy_action_projector.")}
    torch.save(head_state, directory / "action_head--100_checkpoint.pt")
    if head == "diffusion":
        torch.save({f"module.{k}": v for k, v in
                    action_head.noisy_action_projector.state_dict().items()},
                   directory / "noisy_action_projector--100_checkpoint.pt")
    proprio = ProprioProjector(5, 64)
    torch.save({f"module.{k}": v for k, v in proprio.state_dict().items()},
               directory / "proprio_projector--100_checkpoint.pt")
    stats = {"libero_spatial": {**FINETUNED["libero"],
                                "proprio": {"q01": [-1.0] * 5, "q99": [1.0] * 5}}}
    (directory / "dataset_statistics.json").write_text(json.dumps(stats))
    return effective, action_head, proprio


def test_load_openvla_oft_reads_head_proprio_and_film_from_the_directory(tmp_path):
    from vlakit.convert import decoder_from_transformers, openvla_vision_state_dicts, vit_from_timm
    from vlakit.models import load_openvla_oft, openvla_oft
    from vlakit.vision import FusedEncoder

    parts = _parts()
    film, action_head, proprio = _write_oft(tmp_path, parts)
    model = load_openvla_oft(tmp_path, num_views=2)
    assert model.encoder.has_film and model.proprio_projector.in_dim == 5
    qkv = model.encoder.encoders[0].blocks[0].attn.qkv.weight  # base + 0.5 B A, not the base
    torch.testing.assert_close(qkv, film["vision_backbone.featurizer.blocks.0.block.attn.qkv"
                                         ".weight"], rtol=0, atol=0)
    assert type(model.head).__name__ == "L1RegressionHead" and model.head.chunk_size == 8
    assert model.head.action_dim == 3 and model.num_views == 2
    # the same model assembled by hand from the written weights
    dino, siglip, llama, _ = parts
    towers = [vit_from_timm(dino, output_layer=-2).truncate(),
              vit_from_timm(siglip, output_layer=-2).truncate()]
    encoder = FusedEncoder(towers)
    encoder.add_film(64)
    weights = openvla_vision_state_dicts(film)  # the weights in effect, as OFT evaluates
    for tower, state in zip(towers, weights):
        tower.load_state_dict({k: v for k, v in state.items() if k in tower.state_dict()})
    hand = openvla_oft(
        encoder=encoder, projector=model.projector, decoder=decoder_from_transformers(
            llama.float()), head=action_head, proprio_projector=proprio,
        action_normalizer=model.action_normalizer, proprio_normalizer=model.proprio_normalizer)
    hand.projector = model.projector
    hand.decoder.load_state_dict(model.decoder.state_dict())  # bf16-rounded, as stored
    hand.head.load_state_dict(action_head.state_dict())
    inputs = VLAInputs(input_ids=torch.tensor([[10, 11, 12]]), text_valid=torch.ones(1, 3,
                       dtype=torch.bool), pixels=torch.randn(1, 2, 6, 28, 28),
                       proprio=torch.rand(1, 5))
    torch.testing.assert_close(model.eval().predict_action(inputs),
                               hand.eval().predict_action(inputs), atol=1e-5, rtol=0)


def test_load_openvla_oft_finds_a_diffusion_head_and_lightvla_prunes(tmp_path):
    from vlakit.models import load_lightvla, load_openvla_oft
    from vlakit.pruners import LightVLAPruner

    _, action_head, _ = _write_oft(tmp_path, _parts(), head="diffusion")
    model = load_openvla_oft(tmp_path, num_inference_steps=2, num_views=2)
    assert type(model.head).__name__ == "DiffusionActionHead"
    for key, value in action_head.state_dict().items():
        assert torch.equal(model.head.state_dict()[key], value), key
    light = load_lightvla(tmp_path, num_inference_steps=2, num_views=2)
    assert isinstance(light.pruner, LightVLAPruner) and light.head.predict_read == "next"
    head_file = tmp_path / "action_head--100_checkpoint.pt"
    head_file.rename(tmp_path / "action_head--200_checkpoint.pt")
    with pytest.raises(CheckpointError, match="no action_head--100_checkpoint.pt"):
        load_openvla_oft(tmp_path, step="100")
    for file in tmp_path.glob("action_head--*"):
        file.unlink()
    with pytest.raises(CheckpointError, match="not an OpenVLA-OFT run directory"):
        load_openvla_oft(tmp_path)


def test_oft_and_lightvla_loaders_build_for_the_runs_view_count(tmp_path):
    """OFT's run folders do not record num_images_in_input (a training flag): the loaders
    take it from num_views=, else from config.json when it holds one, and then refuse a
    batch with another count."""
    from vlakit.models import load_lightvla, load_openvla_oft

    _write_oft(tmp_path, _parts())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_images_in_input": 2}))
    inputs = dict(input_ids=torch.tensor([[10, 11, 12]]),
                  text_valid=torch.ones(1, 3, dtype=torch.bool), proprio=torch.rand(1, 5))
    for load in (load_openvla_oft, load_lightvla):
        model = load(tmp_path).eval()
        assert model.num_views == 2
        assert model.predict_action(VLAInputs(**inputs, pixels=torch.randn(1, 2, 6, 28, 28)
                                              )).shape == (1, 8, 3)
        with pytest.raises(ValueError, match=r"built for 2 camera view\(s\) per example but "
                                             r"inputs\.pixels has 1"):
            model.predict_action(VLAInputs(**inputs, pixels=torch.randn(1, 1, 6, 28, 28)))
        assert load(tmp_path, num_views=1).num_views == 1  # the argument wins
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_openvla_oft(tmp_path, num_views=3).num_views == 3
    with pytest.raises(ValueError, match=r"does not record how many camera views .* pass "
                                         r"num_views="):
        load_openvla_oft(tmp_path)  # neither given nor recorded: never any count


def _adapter(directory, targets, config=None):
    directory.mkdir()
    g = torch.Generator().manual_seed(8)
    weights = {}
    for target, (out, inp) in targets.items():
        weights[f"base_model.model.{target}.lora_A.weight"] = torch.randn(4, inp, generator=g)
        weights[f"base_model.model.{target}.lora_B.weight"] = torch.randn(out, 4, generator=g)
    save_file(weights, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(
        config or {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none",
                   "target_modules": ["q_proj", "qkv"]}))
    return weights


def test_a_lora_adapter_is_merged_into_the_base_weights(written, tmp_path):
    directory, _, state = written
    targets = {"language_model.model.layers.0.self_attn.q_proj": (64, 64),
               "vision_backbone.featurizer.blocks.0.attn.qkv": (96, 32)}
    weights = _adapter(tmp_path / "lora", targets)
    model = load_openvla(directory, adapter=tmp_path / "lora")
    for target, module in (
        ("language_model.model.layers.0.self_attn.q_proj", model.decoder.layers[0].attn.q_proj),
        ("vision_backbone.featurizer.blocks.0.attn.qkv", model.encoder.encoders[0].blocks[0]
         .attn.qkv),
    ):
        a = weights[f"base_model.model.{target}.lora_A.weight"]
        b = weights[f"base_model.model.{target}.lora_B.weight"]
        base = state[f"{target}.weight"].float()
        expected = (base + 2.0 * b @ a).to(torch.bfloat16).float()  # alpha / r = 8 / 4
        torch.testing.assert_close(module.weight, expected, rtol=0, atol=0)
    untouched = model.decoder.layers[1].attn.q_proj.weight
    assert torch.equal(untouched,
                       state["language_model.model.layers.1.self_attn.q_proj.weight"].float())


def test_adapters_for_other_layers_or_other_methods_are_refused(written, tmp_path):
    directory, _, _ = written
    _adapter(tmp_path / "other", {"language_model.model.layers.9.self_attn.q_proj": (64, 64)})
    with pytest.raises(CheckpointError, match="adapts 'language_model.model.layers.9.self_attn"
                                              r"\.q_proj.weight', which the base"):
        load_openvla(directory, adapter=tmp_path / "other")
    _adapter(tmp_path / "dora", {"language_model.model.layers.0.self_attn.q_proj": (64, 64)},
             config={"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
        load_openvla(directory, adapter=tmp_path / "dora")
    _adapter(tmp_path / "ia3", {"language_model.model.layers.0.self_attn.q_proj": (64, 64)},
             config={"peft_type": "IA3"})
    with pytest.raises(CheckpointError, match="peft_type 'IA3' is not supported"):
        load_openvla(directory, adapter=tmp_path / "ia3")
    _adapter(tmp_path / "shape", {"language_model.model.layers.0.self_attn.q_proj": (64, 32)})
    with pytest.raises(CheckpointError, match=r"is 64 x 32 \(rank 4\), but the base weight"):
        load_openvla(directory, adapter=tmp_path / "shape")


def test_a_lora_adapter_can_be_kept_as_lora_layers(written, tmp_path):
    from vlakit.core import LoRALinear, merge_lora

    directory, _, state = written
    target = "language_model.model.layers.0.self_attn.q_proj"
    weights = _adapter(tmp_path / "lora", {target: (64, 64),
                                           "vision_backbone.featurizer.blocks.0.attn.qkv":
                                           (96, 32)})
    kept = load_openvla(directory, adapter=tmp_path / "lora", merge_adapter=False)
    layer = kept.decoder.layers[0].attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scale == 2.0 and layer.rank == 4
    assert isinstance(kept.encoder.encoders[0].blocks[0].attn.qkv, LoRALinear)
    assert not layer.weight.requires_grad and layer.lora_A.weight.requires_grad
    a = weights[f"base_model.model.{target}.lora_A.weight"]
    b = weights[f"base_model.model.{target}.lora_B.weight"]
    torch.testing.assert_close(layer.merged_weight(),
                               state[f"{target}.weight"].float() + 2.0 * b @ a)
    ids = torch.tensor([[10, 11, 12]])
    batch = VLAInputs(input_ids=ids, text_valid=ids > 0, pixels=torch.randn(1, 1, 6, 28, 28))
    with torch.no_grad():
        before = kept.eval()(batch, return_logits=True).logits
        assert merge_lora(kept) == ["encoder.encoders.0.blocks.0.attn.qkv",
                                    "decoder.layers.0.attn.q_proj"]
        after = kept(batch, return_logits=True).logits
    assert type(kept.decoder.layers[0].attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_a_non_llama_language_model_loads_through_hfdecoder(tmp_path):
    """The config's text_config names another causal LM (Mistral here, as in Prismatic's
    mistral backbones): it is built by transformers and wrapped in HFDecoder."""
    from transformers import MistralConfig, MistralForCausalLM

    from vlakit.decoders import HFDecoder

    dino, siglip, _, projector = _parts()
    text = dict(model_type="mistral", vocab_size=384, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256)
    mistral = MistralForCausalLM(MistralConfig(**{k: v for k, v in text.items()
                                                  if k != "model_type"})).eval()
    parts = (dino, siglip, mistral, projector)
    config = json.loads(json.dumps({
        "model_type": "openvla", "timm_model_ids": ["vlakit_test_dino_reg4", "vlakit_test_siglip"],
        "image_sizes": [28, 28], "text_config": text, "pad_to_multiple_of": 64,
        "norm_stats": CONFIG_STATS}))
    state = _write(tmp_path, *parts, config=config)
    model = load_openvla(tmp_path)
    assert isinstance(model.decoder, HFDecoder)
    ids = torch.tensor([[10, 11, 12, 13]])
    pixels = torch.randn(1, 6, 28, 28)
    with torch.no_grad():
        out = model.eval()(VLAInputs(input_ids=ids, text_valid=ids > 0, pixels=pixels[:, None]),
                           return_logits=True)
    torch.testing.assert_close(out.logits[0], _reference_logits(parts, state, pixels, ids),
                               atol=1e-4, rtol=0)


def test_bf16_loading_keeps_the_statistics_in_float32(written):
    directory, _, _ = written
    model = load_openvla(directory, dtype=torch.bfloat16)
    assert model.action_normalizer.low.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_peft_patterns_rslora_and_unsupported_adapters(tmp_path):
    from safetensors.torch import save_file

    from vlakit.convert import LoraAdapter

    folder = tmp_path / "a"
    folder.mkdir()
    save_file({"base_model.model.m.q_proj.lora_A.weight": torch.ones(2, 3),
               "base_model.model.m.q_proj.lora_B.weight": torch.ones(3, 2),
               "base_model.model.m.o_proj.lora_A.weight": torch.ones(4, 3),
               "base_model.model.m.o_proj.lora_B.weight": torch.ones(3, 4)},
              folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 8,
              "alpha_pattern": {"proj": 1.0, "q_.*": 6.0}, "rank_pattern": {"q_proj": 2}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    adapter = LoraAdapter(folder)
    assert adapter.scale("m.q_proj.weight") == 6.0 / 2  # regex key; r from the stored A
    assert adapter.scale("m.o_proj.weight") == 8 / 4  # "proj" does not match "o_proj" whole
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True,
                                                            "alpha_pattern": {}}))
    assert LoraAdapter(folder).scale("m.o_proj.weight") == 8 / 2.0  # alpha / sqrt(4)
    save_file({"base_model.model.m.q_proj.lora_A.weight": torch.ones(2, 3),
               "base_model.model.m.q_proj.lora_B.bias": torch.ones(3)},
              folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="LoRA biases"):
        LoraAdapter(folder)


def test_a_run_folder_loads_as_a_policy_bundle_that_does_what_ofts_eval_does(tmp_path):
    """openvla_oft_policy: the run folder's tokenizer, OFT's processor options (the
    instruction lower-cased, "▁" appended) and openpi's LIBERO keys; raw observations in."""
    import numpy as np
    from _tiny import tiny_tokenizer

    from vlakit.bundle import PolicyBundle
    from vlakit.heads import Sampling
    from vlakit.models import lightvla_policy, load_openvla_oft, openvla_oft_policy
    from vlakit.processors import OpenVLAProcessor

    _write_oft(tmp_path, _parts())
    with pytest.raises(CheckpointError, match="holds no tokenizer .* pass tokenizer="):
        openvla_oft_policy(tmp_path, num_views=2)
    tokenizer = tiny_tokenizer(tmp_path)  # written into the run folder, as OFT's are
    policy = openvla_oft_policy(tmp_path, num_views=2)
    assert policy.keys.images == ("observation/image", "observation/wrist_image")
    assert policy.keys.state == "observation/state" and policy.processor.lowercase
    assert policy.processor.append_token_id == tokenizer.convert_tokens_to_ids("▁")
    assert not policy.model.training
    g = np.random.default_rng(0)
    observation = {"observation/image": g.integers(0, 256, (28, 28, 3), dtype=np.uint8),
                   "observation/wrist_image": g.integers(0, 256, (28, 28, 3), dtype=np.uint8),
                   "observation/state": g.random(5).astype(np.float32),
                   "prompt": "Pick Up The Cup"}
    chunk = policy(observation)
    assert chunk.shape == (8, 3) and chunk.dtype == np.float32
    # by hand: the same model, the instruction lower-cased as OFT's eval does
    model = load_openvla_oft(tmp_path, num_views=2).eval()
    processor = OpenVLAProcessor.from_model(tokenizer, model)
    pixels = torch.cat([model.encoder.preprocess(observation[k]) for k in policy.keys.images])
    batch = processor(None, ["pick up the cup"], proprio=observation["observation/state"][None],
                      pixels=pixels[None])
    np.testing.assert_allclose(chunk, model.predict_action(batch)[0].numpy(), atol=1e-6)
    # it saves as one directory and loads back the same
    again = PolicyBundle.load(policy.save(tmp_path / "bundle"))
    assert again.processor.lowercase
    np.testing.assert_allclose(again(observation, Sampling()), chunk, atol=1e-6)
    light = lightvla_policy(tmp_path, num_views=2)
    assert light.processor.lowercase and type(light.model.pruner).__name__ == "LightVLAPruner"
    assert light(observation).shape == (8, 3)


def test_an_openvla_directory_loads_as_a_one_camera_policy(tmp_path):
    import numpy as np
    from _tiny import tiny_tokenizer

    from vlakit.models import openvla_policy

    _write(tmp_path, *_parts())
    tiny_tokenizer(tmp_path)
    policy = openvla_policy(tmp_path)
    assert policy.keys.images == ("observation/image",) and policy.keys.state is None
    assert policy.processor.lowercase and policy.model.num_views == 1
    image = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    chunk = policy({"observation/image": image, "prompt": "Open Drawer"})
    assert chunk.shape == (1, policy.model.head.action_dim)
    np.testing.assert_array_equal(chunk, policy({"observation/image": image,
                                                 "prompt": "open drawer"}))
