"""The policy bundle: one directory, one call to load, raw observations in, chunks out."""

import json

import numpy as np
import pytest
import torch
from _tiny import tiny_flow_vla
from PIL import Image

from vlakit.bundle import ObservationKeys, PolicyBundle
from vlakit.distributed import oft_lora
from vlakit.heads import Sampling
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer

KEYS = ObservationKeys(images=("observation/image", "observation/wrist_image"),
                       state="observation/state", prompt="prompt")
TASKS = ["pick up the red block", "open the drawer"]


_model = tiny_flow_vla


def _bundle(model=None):
    model = _model() if model is None else model
    processor = OpenVLAProcessor.from_model(word_tokenizer([OPENVLA_PROMPT, *TASKS]), model)
    return PolicyBundle(model, processor, KEYS)


def _observation(seed=0, task=TASKS[0]):
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),  # HWC
        "observation/wrist_image": Image.fromarray(
            rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),  # PIL, another size
        "observation/state": rng.standard_normal(5).astype(np.float32),
        "prompt": task,
    }


def _seeded(seed=0):
    return Sampling(generator=torch.Generator().manual_seed(seed))


def test_a_raw_observation_becomes_an_action_chunk():
    bundle = _bundle()
    chunk = bundle(_observation(), _seeded())
    assert chunk.shape == (4, 3) and chunk.dtype == np.float32
    # the same as building the batch by hand
    obs = _observation()
    model, processor = bundle.model, bundle.processor
    pixels = torch.stack([torch.cat([
        model.encoder.preprocess(torch.from_numpy(obs["observation/image"]).permute(2, 0, 1)),
        model.encoder.preprocess(obs["observation/wrist_image"]),
    ])])
    batch = processor(None, [obs["prompt"]], proprio=obs["observation/state"][None],
                      pixels=pixels)
    want = model.predict_action(batch, _seeded())[0].numpy()
    np.testing.assert_array_equal(chunk, want)
    many = bundle([_observation(0), _observation(1, TASKS[1])], _seeded())
    assert many.shape == (2, 4, 3)


def test_save_and_load_in_one_call_give_identical_actions(tmp_path):
    model = _model()
    oft_lora(model, rank=2)  # a transformed model saves too
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    bundle = _bundle(model)
    bundle.save(tmp_path / "policy")
    assert {p.name for p in (tmp_path / "policy").iterdir()} == {"policy.json", "model",
                                                                  "tokenizer"}
    info = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert info["observation"]["images"] == list(KEYS.images)
    assert info["image_size"] == [28, 28] and info["num_views"] == 2
    assert info["action"] == {"chunk_size": 4, "action_dim": 3} and info["proprio_dim"] == 5
    assert info["processor"]["args"]["prompt_template"] == OPENVLA_PROMPT
    loaded = PolicyBundle.load(tmp_path / "policy")
    assert loaded.keys == KEYS
    # equal up to float rounding: memory-mapped weights sit at other alignments, and MKL's
    # GEMMs may sum in another order there (its reproducibility is per alignment)
    for obs in (_observation(0), _observation(2, TASKS[1])):
        np.testing.assert_allclose(loaded(obs, _seeded(3)), bundle(obs, _seeded(3)),
                                   rtol=1e-6, atol=1e-6)
    assert loaded.processor.prompt_ids(TASKS[1]) == bundle.processor.prompt_ids(TASKS[1])


def test_bad_observations_and_bundles_are_refused_by_name(tmp_path):
    bundle = _bundle()
    obs = _observation()
    del obs["observation/state"]
    with pytest.raises(KeyError, match="lacks \\['observation/state'\\]"):
        bundle(obs)
    with pytest.raises(KeyError, match="does not read: \\['extra'\\]"):
        bundle({**_observation(), "extra": 1})
    with pytest.raises(TypeError, match="'prompt' must be a string"):
        bundle({**_observation(), "prompt": 3})
    with pytest.raises(ValueError, match="reads 2 camera view"):
        PolicyBundle(_model(), bundle.processor, ObservationKeys(images=("a",), state="s"))
    with pytest.raises(ValueError, match="state=None.*reads the robot state"):
        PolicyBundle(_model(), bundle.processor, ObservationKeys(images=("a", "b")))
    with pytest.raises(ValueError, match="repeats a key"):
        ObservationKeys(images=("a", "a"))
    with pytest.raises(Exception, match="not a policy bundle"):
        PolicyBundle.load(tmp_path)


def test_the_kept_meta_world_policy_still_loads_and_predicts():
    # benchmarks/metaworld/trained_policy: the bundle the Meta-World run trained (kept so
    # that it can be served without retraining); a format change must keep it loadable
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "metaworld" / "trained_policy"
    bundle = PolicyBundle.load(root)
    assert bundle.keys.images == ("observation/image",) and bundle.keys.state
    obs = {"observation/image": np.zeros((64, 64, 3), np.uint8),
           "observation/state": np.zeros(39, np.float32), "prompt": "open the door"}
    actions = bundle(obs)
    assert actions.shape == (4, 4) and np.isfinite(actions).all()
