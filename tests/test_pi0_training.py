"""Fine-tuning pi0 / pi0.5: openpi's LoRA recipe (pi0_lora), merged == unmerged, saved and
loaded back as a bundle, compiled (tests/scripts/compile_pi0.py) and trained with the
library's recipe on a LeRobot v3 folder (FSDP2 at world size 1 is in test_fsdp.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pi0_parity import CHUNK, MAX_DIM, _inputs, _tiny

from vlakit.bundle import PolicyBundle
from vlakit.core import LoRALinear, merge_lora
from vlakit.distributed import pi0_lora
from vlakit.heads import Sampling

SCRIPTS = Path(__file__).parent / "scripts"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _adapted(variant):
    model = _tiny(variant)
    names = pi0_lora(model)
    with torch.no_grad():  # B starts at zero; make the adapters matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model, names


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_pi0_lora_is_openpis_recipe(variant):
    model, names = _adapted(variant)
    # PaliGemma: layer 0 whole (7 projections), the last layer's K/V; the expert: 2 x 7
    assert len(names) == 7 + 2 + 2 * 7
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear)
        want = (16, 16.0) if name.startswith("decoder.") else (32, 32.0)
        assert (layer.lora_A.weight.shape[0], layer.scale * layer.lora_A.weight.shape[0]) == want
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, _ in model.named_parameters():
        in_stack = name.startswith(("decoder.", "head.expert."))
        assert (name in trainable) == (not in_stack or ".lora_" in name), name
    assert "encoder.patch_embed.proj.weight" in trainable  # openpi trains the vision tower
    assert "head.action_in_proj.weight" in trainable


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_merged_lora_equals_unmerged(variant):
    model, _ = _adapted(variant)
    model.eval()
    inputs = _inputs(variant == "pi0")
    noise = Sampling(noise=torch.randn(3, CHUNK, MAX_DIM, generator=torch.Generator()
                                       .manual_seed(1)))
    before = model.predict_action(inputs, noise, unnormalize=False)
    plain = _tiny(variant).eval().predict_action(inputs, noise, unnormalize=False)
    assert not torch.allclose(before, plain, atol=1e-3)  # the adapters change the actions
    merged = merge_lora(model)
    assert len(merged) == 23 and not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model.predict_action(inputs, noise, unnormalize=False), before,
                               atol=1e-5, rtol=1e-5)


def test_compiled_pi0_with_lora_equals_eager():
    env = {k: v for k, v in os.environ.items() if k != "VLAKIT_TYPECHECK"}
    done = subprocess.run([sys.executable, str(SCRIPTS / "compile_pi0.py")],
                          capture_output=True, text=True, timeout=900, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for variant in ("pi0", "pi05"):
        assert f"{variant}: compile_for_inference fullgraph OK" in out
        assert f"{variant}: compile_blocks with LoRA: loss and" in out
    assert "COMPILE PI0 OK" in out


def test_the_recipe_fine_tunes_a_tiny_pi0_with_lora_on_a_lerobot_folder(tmp_path):
    from test_lerobot_data import write_dataset

    data = write_dataset(tmp_path / "dataset")
    out = tmp_path / "run"
    command = [sys.executable, str(EXAMPLES / "train.py"), "--model", "pi0", "--lora",
               "--data", str(data), "--chunk", "4", "--batch", "8", "--steps", "40",
               "--lr", "3e-3", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLAKIT_TYPECHECK": "0"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                          cwd=EXAMPLES)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = np.loadtxt(out / "loss.csv", delimiter=",", skiprows=1)[:, 1]
    assert losses[-5:].mean() < 0.6 * losses[:5].mean(), losses  # the loss falls
    assert "pi0 flow-matching velocity MSE" in done.stdout
    policy = PolicyBundle.load(out / "policy")  # the LoRA layers come back with it
    assert any(isinstance(m, LoRALinear) for m in policy.model.modules())
    frame = {key: np.zeros((32, 32, 3), np.uint8) for key in policy.keys.images}
    frame |= {policy.keys.state: np.zeros(3, np.float32), policy.keys.prompt: "pick the cup"}
    assert policy(frame, Sampling(noise=torch.zeros(1, 4, 8))).shape == (4, 2)


def test_the_recipe_refuses_pi0_without_a_folder(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--model", "pi0",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=EXAMPLES)
    assert done.returncode != 0 and "--model pi0 trains on a LeRobot folder" in done.stderr


def test_pi0_lora_refuses_a_model_without_an_expert():
    from test_pi0_inputs import _model

    from vlakit.heads import L1RegressionHead
    from vlakit.processors import word_tokenizer

    model = _model("pi0", word_tokenizer(["a task"]))
    model.head = L1RegressionHead(32, chunk_size=CHUNK, action_dim=3)
    with pytest.raises(TypeError, match="holds no expert.*oft_lora"):
        pi0_lora(model)
