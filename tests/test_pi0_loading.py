"""load_pi0 / load_pi05 on LeRobot's and openpi's directory layouts.

``tests/data/lerobot_pi0/`` holds tiny pi0 and pi0.5 policy directories written by LeRobot
0.6.1 itself (``PI0Policy`` / ``PI05Policy.save_pretrained`` and the pre/post-processor
pipelines, random weights and statistics), a tiny PaliGemma-like tokenizer, and what
LeRobot's own classes computed on them (raw observations, the noise, the unnormalised
actions of ``sample_actions``; with both cameras and with the wrist camera missing). See
its README for how they were made. openpi's layout is written by the tests from those
weights, the way openpi's conversion writes it.
"""

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlakit.bundle import PolicyBundle
from vlakit.core import CheckpointError, building
from vlakit.heads import Sampling
from vlakit.models import (
    load_pi0,
    load_pi05,
    pi0,
    pi0_decoder,
    pi0_expert,
    pi0_preprocessing,
    pi05,
)
from vlakit.projectors import LinearProjector
from vlakit.vision import vit

DATA = Path(__file__).parent / "data" / "lerobot_pi0"
TASKS = ["pick up the red cube", "open_the drawer\n"]  # the second already ends in "\n"
VARIANTS = {"pi0": load_pi0, "pi05": load_pi05}


def _tiny(variant, *, action_dim, chunk_size, num_steps, max_dim, prompt_length, num_views,
          img_size, action_normalizer, proprio_normalizer=None, state_normalizer=None,
          device=None, keep_final_gate=False):
    """The fixtures' sizes (LeRobot's variants shrunk): SigLIP 32 wide, 2 layers; Gemma 64
    wide, 2 layers, 2 heads of 16, 1 KV head, vocabulary 256; expert 32 wide."""
    with building(None, device):
        parts = dict(
            encoder=vit(img_size=img_size, patch_size=14, dim=32, depth=2, num_heads=2,
                        mlp_dim=64, gelu_approximate="tanh",
                        preprocessing=pi0_preprocessing(img_size)),
            projector=LinearProjector(32, 64, bias=True),
            decoder=pi0_decoder(vocab_size=256, dim=64, num_layers=2, num_heads=2,
                                num_kv_heads=1, head_dim=16, mlp_dim=128),
            action_dim=action_dim, chunk_size=chunk_size, num_steps=num_steps,
            max_dim=max_dim, prompt_length=prompt_length, num_views=num_views,
            image_token_id=256, action_normalizer=action_normalizer)
        expert = pi0_expert(dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                            mlp_dim=64, cond_dim=32 if variant == "pi05" else None,
                            keep_final_gate=keep_final_gate)
        if variant == "pi05":
            return pi05(expert=expert, state_normalizer=state_normalizer, **parts)
        return pi0(expert=expert, proprio_normalizer=proprio_normalizer, **parts)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))


def _load(variant, tokenizer, path=None, **kwargs):
    return VARIANTS[variant](DATA / f"{variant}_tiny" if path is None else path, tokenizer,
                             build=functools.partial(_tiny, variant), **kwargs)


def _observations(bundle, reference, tag):
    rows = []
    for i, task in enumerate(TASKS):
        obs = {key: (reference[f"{tag}/raw/{key}"][i] if f"{tag}/raw/{key}" in reference
                     else None) for key in bundle.keys.images}  # CHW float [0, 1], 24 x 32
        obs[bundle.keys.state] = reference[f"{tag}/raw/observation.state"][i].numpy()
        obs[bundle.keys.prompt] = task
        rows.append(obs)
    return rows


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("tag", ["full", "missing_wrist"])
def test_a_lerobot_directory_gives_lerobots_actions(variant, tag, tokenizer):
    bundle = _load(variant, tokenizer)
    assert bundle.keys.images == ("observation.images.base_0_rgb",
                                  "observation.images.left_wrist_0_rgb")
    assert (bundle.keys.state, bundle.keys.prompt) == ("observation.state", "task")
    reference = load_file(str(DATA / f"{variant}_tiny_reference_io.safetensors"))
    batch = bundle.inputs(_observations(bundle, reference, tag))
    if variant == "pi0":
        got = bundle.model.proprio_normalizer.normalize(batch.proprio)
        torch.testing.assert_close(got, reference[f"{tag}/state_normalized"])
    for view in range(2):  # LeRobot's letterbox of the 24 x 32 images (the absent one: -1)
        torch.testing.assert_close(batch.pixels[:, view], reference[f"{tag}/images/{view}"])
    actions = bundle.model.predict_action(batch, Sampling(noise=reference[f"{tag}/noise"]))
    torch.testing.assert_close(actions, reference[f"{tag}/actions"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_never_read_weights_are_skipped_and_reported(variant, tokenizer):
    _, report = _load(variant, tokenizer, return_report=True)
    prefix = "model.paligemma_with_expert."
    last = f"{prefix}paligemma.model.language_model.layers.1."
    expected = {f"{prefix}gemma_expert.lm_head.weight", f"{prefix}paligemma.lm_head.weight",
                f"{prefix}paligemma.model.language_model.norm.weight",
                f"{last}self_attn.q_proj.weight", f"{last}self_attn.o_proj.weight",
                f"{last}mlp.gate_proj.weight", f"{last}mlp.up_proj.weight",
                f"{last}mlp.down_proj.weight", f"{last}post_attention_layernorm.weight"}
    if variant == "pi05":  # the gate third of the expert's final adaptive norm
        norm = f"{prefix}gemma_expert.model.norm.dense."
        expected |= {f"{norm}weight[64:]", f"{norm}bias[64:]"}
    assert set(report.skipped) == expected
    kept, kept_report = VARIANTS[variant](
        DATA / f"{variant}_tiny", tokenizer, return_report=True,
        build=functools.partial(_tiny, variant, keep_final_gate=variant == "pi05"))
    if variant == "pi05":  # a model that keeps the gate rows loads them
        assert not any("norm.dense" in k for k in kept_report.skipped)
        assert kept.model.head.expert.norm.dense.weight.shape == (96, 32)


def test_one_variant_into_the_other_is_refused_by_its_keys(tokenizer):
    with pytest.raises(CheckpointError, match=r"pi0\.5 checkpoint, not pi0.*time_mlp_in.*"
                                              r"load_pi05"):
        load_pi0(DATA / "pi05_tiny", tokenizer, build=functools.partial(_tiny, "pi0"))
    with pytest.raises(CheckpointError, match=r"pi0 checkpoint, not pi0\.5.*state_proj.*"
                                              r"load_pi0"):
        load_pi05(DATA / "pi0_tiny", tokenizer, build=functools.partial(_tiny, "pi05"))


def _rewrite(tmp_path, variant, edit):
    """A copy of a fixture directory with its weights edited."""
    target = tmp_path / variant
    shutil.copytree(DATA / f"{variant}_tiny", target)
    weights = load_file(str(target / "model.safetensors"))
    save_file(edit(weights), str(target / "model.safetensors"))
    return target


def test_a_missing_or_unknown_weight_is_an_error_naming_it(tokenizer, tmp_path):
    key = "model.paligemma_with_expert.gemma_expert.model.layers.0.self_attn.k_proj.weight"
    path = _rewrite(tmp_path / "a", "pi0", lambda w: {k: v for k, v in w.items() if k != key})
    with pytest.raises(CheckpointError, match=r"missing.*head\.expert\.layers\.0\.attn\.k_proj"):
        _load("pi0", tokenizer, path)
    path = _rewrite(tmp_path / "b", "pi0", lambda w: {**w, "model.extra_proj.weight":
                                                      torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="extra_proj"):
        _load("pi0", tokenizer, path)
    key = "model.action_in_proj.weight"
    path = _rewrite(tmp_path / "c", "pi0", lambda w: {**w, key: torch.zeros(32, 16)})
    with pytest.raises(CheckpointError, match="action_in_proj"):
        _load("pi0", tokenizer, path)


def _openpi_directory(tmp_path, variant):
    """The fixture's weights as openpi's conversion writes them: no ``model.`` prefix, the
    PaliGemma embedding stored as its LM head (no ``embed_tokens``), the vision tower in the
    flattened key form of later transformers, openpi's small config.json and
    ``assets/<name>/norm_stats.json``."""
    source = DATA / f"{variant}_tiny"
    weights = load_file(str(source / "model.safetensors"))
    pali = "paligemma_with_expert.paligemma."
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("model.")
        if key in (f"{pali}lm_head.weight",):
            continue
        if key == f"{pali}model.language_model.embed_tokens.weight":
            key = f"{pali}lm_head.weight"
        out[key.replace("vision_tower.vision_model.", "vision_tower.")] = value.contiguous()
    target = tmp_path / f"{variant}_openpi"
    target.mkdir(parents=True)
    save_file(out, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps({
        "action_dim": 32, "action_horizon": 4, "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m", "precision": "float32"}))
    stats = load_file(str(source / "policy_preprocessor_step_"
                          f"{6 if variant == 'pi0' else 3}_normalizer_processor.safetensors"))
    norm = {"state": {s: stats[f"observation.state.{s}"].tolist() for s in
                      ("mean", "std", "q01", "q99")},
            "actions": {s: stats[f"action.{s}"].tolist() + [0.0] * 25 for s in
                        ("mean", "std", "q01", "q99")}}  # openpi pads them to 32
    (target / "assets" / "robot").mkdir(parents=True)
    (target / "assets" / "robot" / "norm_stats.json").write_text(json.dumps(
        {"norm_stats": norm}))
    return target


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_openpis_layout_loads_the_same_weights(variant, tokenizer, tmp_path):
    lerobot = _load(variant, tokenizer)
    openpi, report = _load(variant, tokenizer, _openpi_directory(tmp_path, variant),
                           num_views=2, action_dim=7, return_report=True)
    assert "paligemma_with_expert.gemma_expert.lm_head.weight" in report.skipped
    assert "paligemma_with_expert.paligemma.lm_head.weight" not in report.skipped  # = embed
    theirs = openpi.model.state_dict()
    for key, value in lerobot.model.state_dict().items():
        if "normalizer" not in key:
            assert torch.equal(theirs[key], value), key
    assert openpi.keys.images == ("observation/image", "observation/wrist_image")
    assert openpi.model.action_normalizer.form == "openpi"
    assert openpi.model.action_normalizer.eps == 1e-6
    with pytest.raises(CheckpointError, match="norm_stats"):
        empty = tmp_path / "bare"
        shutil.copytree(_openpi_directory(tmp_path / "x", variant), empty)
        shutil.rmtree(empty / "assets")
        _load(variant, tokenizer, empty, num_views=2, action_dim=7)


def test_a_loaded_policy_saves_and_loads_back_as_a_bundle(tokenizer, tmp_path):
    bundle = _load("pi05", tokenizer)
    reference = load_file(str(DATA / "pi05_tiny_reference_io.safetensors"))
    observations = _observations(bundle, reference, "full")
    noise = reference["full/noise"]
    before = bundle(observations, Sampling(noise=noise))
    again = PolicyBundle.load(bundle.save(tmp_path / "policy"))
    np.testing.assert_allclose(again(observations, Sampling(noise=noise)), before, atol=1e-6)
    np.testing.assert_allclose(before, reference["full/actions"].numpy(), atol=2e-5)
