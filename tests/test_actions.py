import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vlakit.actions import ActionNormalizer, ActionTokenizer, load_norm_stats

# --- numpy re-implementations of the published algorithms (OpenVLA / OpenVLA-OFT) ---------


def np_encode(actions, vocab_end=32000, num_bins=256, low=-1.0, high=1.0):
    bins = np.linspace(low, high, num_bins)
    return vocab_end - np.digitize(np.clip(actions, low, high), bins)


def np_decode(ids, vocab_end=32000, num_bins=256, low=-1.0, high=1.0):
    bins = np.linspace(low, high, num_bins)
    centres = (bins[:-1] + bins[1:]) / 2.0
    return centres[np.clip(vocab_end - ids - 1, 0, num_bins - 2)]


def np_normalize_bounds(x, low, high, mask, lo_all, hi_all):
    """OpenVLA's RLDS pipeline: clipped affine map on masked dims, 0 on constant dims."""
    y = np.where(mask, np.clip(2 * (x - low) / (high - low + 1e-8) - 1, -1, 1), x)
    return np.where(lo_all == hi_all, 0.0, y)


def np_unnormalize_oft(y, low, high, mask):
    return np.where(mask, 0.5 * (y + 1) * (high - low + 1e-8) + low, y)


def np_unnormalize_openvla(y, low, high, mask):
    return np.where(mask, 0.5 * (y + 1) * (high - low) + low, y)


# --- ActionTokenizer -----------------------------------------------------------------------


@pytest.fixture
def tok():
    return ActionTokenizer(vocab_end=32000, action_dim=7)


def test_openvla_token_range_and_hand_picked_ids(tok):
    assert tok.token_ids == range(31744, 32000)
    assert tok.bins.shape == (256,) and tok.bin_centers.shape == (255,)
    a = torch.tensor([-1.0, 1.0, 0.0, -5.0, 5.0, -0.999, 0.999], dtype=torch.float64)
    assert tok.encode(a).tolist() == [31999, 31744, 31872, 31999, 31744, 31999, 31745]
    ids = torch.tensor([31999, 31744, 31745, 31872, 32000, 0, 31998])
    out = tok.decode(ids, dtype=torch.float64)
    first, last = -1 + 1 / 255, 1 - 1 / 255
    expected = [first, last, last, 0.0, first, last, -1 + 3 / 255]
    assert out.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.dtype == torch.float64
    assert tok.decode(ids).dtype == torch.float32
    assert tok.bin_width == pytest.approx(2 / 255)


def test_encode_matches_numpy_digitize_at_edges_and_random_values(tok):
    bins = np.linspace(-1, 1, 256)
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.uniform(-1.5, 1.5, 7000),
            bins,
            np.nextafter(bins, -np.inf),
            np.nextafter(bins, np.inf),
            [-1.0, 1.0, 0.0, -0.0],
        ]
    )
    values = np.resize(values, (len(values) + (-len(values)) % 7,)).reshape(-1, 7)
    ours = tok.encode(torch.from_numpy(values))
    np.testing.assert_array_equal(ours.numpy(), np_encode(values))
    # float32 inputs: numpy promotes them to float64 inside digitize, and so do we
    values32 = values.astype(np.float32)
    np.testing.assert_array_equal(
        tok.encode(torch.from_numpy(values32)).numpy(), np_encode(values32)
    )
    # bf16 converts exactly as well
    bf = torch.from_numpy(values).to(torch.bfloat16)
    np.testing.assert_array_equal(tok.encode(bf).numpy(), np_encode(bf.double().numpy()))
    # numpy input is accepted and gives a tensor
    assert torch.equal(tok.encode(values), ours)


def test_decode_matches_numpy_for_every_id_and_beyond(tok):
    ids = np.arange(31700, 32050).reshape(-1, 7)
    ours = tok.decode(torch.from_numpy(ids), dtype=torch.float64)
    np.testing.assert_array_equal(ours.numpy(), np_decode(ids))
    assert torch.equal(tok.decode(ids, dtype=torch.float64), ours)


@pytest.mark.parametrize(
    "vocab_end, num_bins, low, high", [(1000, 11, -2.0, 3.0), (257216, 64, -1.0, 1.0)]
)
def test_other_configurations_match_numpy(vocab_end, num_bins, low, high):
    tok = ActionTokenizer(vocab_end, 3, num_bins=num_bins, min_action=low, max_action=high)
    bins = np.linspace(low, high, num_bins)
    values = np.concatenate([bins, np.linspace(low - 1, high + 1, 301)])
    values = np.resize(values, (len(values) + (-len(values)) % 3,)).reshape(-1, 3)
    ids = tok.encode(torch.from_numpy(values))
    np.testing.assert_array_equal(ids.numpy(), np_encode(values, vocab_end, num_bins, low, high))
    np.testing.assert_array_equal(
        tok.decode(ids, dtype=torch.float64).numpy(),
        np_decode(ids.numpy(), vocab_end, num_bins, low, high),
    )
    assert tok.token_ids == range(vocab_end - num_bins, vocab_end)
    assert bool(tok.is_action_token(ids).all())


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5).map(
            lambda shape: (*shape[:-1], 7)
        ),
        elements=st.floats(-3.0, 3.0, allow_nan=False),
    )
)
def test_round_trip_within_half_a_bin_and_exact_against_numpy(actions):
    tok = ActionTokenizer(vocab_end=32000, action_dim=7)
    ids = tok.encode(torch.from_numpy(actions))
    np.testing.assert_array_equal(ids.numpy(), np_encode(actions))
    decoded = tok.decode(ids, dtype=torch.float64).numpy()
    np.testing.assert_array_equal(decoded, np_decode(ids.numpy()))
    error = np.abs(decoded - np.clip(actions, -1, 1))
    assert (error <= tok.bin_width / 2 + 1e-12).all()
    assert bool(tok.is_action_token(ids).all())


def test_is_action_token(tok):
    ids = torch.tensor([[0, 31743, 31744, 31999, 32000, 32063]])
    assert tok.is_action_token(ids).tolist() == [[False, False, True, True, False, False]]


def test_from_tokenizer_uses_vocab_size():
    tok = ActionTokenizer.from_tokenizer(SimpleNamespace(vocab_size=32000), action_dim=7)
    assert tok.vocab_end == 32000 and tok.token_ids == range(31744, 32000)
    with pytest.raises(TypeError, match="vocab_size"):
        ActionTokenizer.from_tokenizer(object(), action_dim=7)


def test_tokenizer_bad_inputs(tok):
    with pytest.raises(ValueError, match=r"last dimension 6, expected 7 \(action_dim=7\)"):
        tok.encode(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="last dimension 8"):
        tok.decode(torch.zeros(2, 8, dtype=torch.long))
    bad = torch.zeros(2, 7)
    bad[0, 1], bad[1, 2], bad[1, 3] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(ValueError, match="1 NaN and 2 infinite"):
        tok.encode(bad)
    with pytest.raises(TypeError):  # the annotation (under shape checking) or the body
        tok.decode(torch.zeros(1, 7))
    with pytest.raises(TypeError):
        tok.encode([[0.0] * 7])


def test_tokenizer_nan_passthrough_matches_reference_when_unchecked():
    tok = ActionTokenizer(32000, 3, check_finite=False)
    values = np.array([[np.nan, np.inf, -np.inf]])
    np.testing.assert_array_equal(tok.encode(values).numpy(), np_encode(values))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_bins": 1}, "num_bins"),
        ({"min_action": 1.0, "max_action": -1.0}, "min_action < max_action"),
        ({"min_action": -float("inf")}, "finite"),
        ({"vocab_end": 100}, "vocab_end"),
        ({"action_dim": 0}, "action_dim"),
    ],
)
def test_tokenizer_constructor_errors(kwargs, message):
    args = {"vocab_end": 32000, "action_dim": 7, **kwargs}
    with pytest.raises(ValueError, match=message):
        ActionTokenizer(**args)


_COMPILE_CHECK = """
import torch
from vlakit.actions import ActionNormalizer, ActionTokenizer

tok = ActionTokenizer(vocab_end=32000, action_dim=7)
norm = ActionNormalizer({"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]})
a = torch.rand(2, 7) * 2 - 1
cases = [(tok.encode, a), (tok.decode, tok.encode(a)), (norm.normalize, a), (norm.unnormalize, a)]
for fn, x in cases:
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), fn(x)), fn
"""


def test_encode_decode_and_normalizer_compile_without_graph_breaks():
    # Shape checking (on in this process) does not compose with torch.compile: run without it.
    env = {k: v for k, v in os.environ.items() if k != "VLAKIT_TYPECHECK"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


# --- ActionNormalizer ----------------------------------------------------------------------

# Made-up statistics in OpenVLA's layout (7-d: 6 deltas + gripper; the gripper is unmasked).
Q01 = [-0.03, -0.04, -0.025, -0.08, -0.09, -0.2, 0.0]
Q99 = [0.03, 0.04, 0.04, 0.08, 0.08, 0.2, 1.0]
MIN = [-0.4, -0.3, -0.3, -0.5, -0.6, -1.0, 0.0]
MAX = [0.4, 0.3, 0.35, 0.5, 0.6, 1.0, 1.0]
MASK = [True] * 6 + [False]
ACTION_STATS = {
    "q01": Q01,
    "q99": Q99,
    "min": MIN,
    "max": MAX,
    "mean": [0.0, 0.001, -0.002, 0.0, 0.0, 0.01, 0.6],
    "std": [0.01, 0.012, 0.013, 0.03, 0.03, 0.07, 0.49],
    "mask": MASK,
}
PROPRIO_STATS = {
    "q01": [0.2, -0.1, 0.0, -3.0, -0.5, -1.0, 0.0],
    "q99": [0.4, 0.2, 0.2, 3.0, 0.5, 1.0, 1.0],
    "min": [0.1, -0.2, 0.0, -3.2, -0.6, -1.2, 0.0],
    "max": [0.5, 0.3, 0.3, 3.2, 0.6, 1.2, 0.0],  # last dim constant (min == max)
    "mean": [0.3] * 7,
    "std": [0.1] * 7,
}
NORM_STATS = {
    "bridge_orig": {
        "action": ACTION_STATS,
        "proprio": PROPRIO_STATS,
        "num_transitions": 2135463,
        "num_trajectories": 60064,
    }
}


def test_bounds_q99_hand_picked_values():
    norm = ActionNormalizer(
        {"q01": [-2.0, 0.0, 10.0], "q99": [2.0, 4.0, 20.0], "mask": [True, True, False]},
        dtype=torch.float64,
    )
    x = torch.tensor([[1.0, 1.0, 0.5], [-9.0, 9.0, 30.0]], dtype=torch.float64)
    y = norm.normalize(x)
    # 2 * 3 / (4 + 1e-8) - 1, 2 * 1 / (4 + 1e-8) - 1; clipped beyond q01/q99; dim 2 untouched
    expected = [[6 / (4 + 1e-8) - 1, 2 / (4 + 1e-8) - 1, 0.5], [-1.0, 1.0, 30.0]]
    assert y.flatten().tolist() == pytest.approx(sum(expected, []), rel=1e-15)
    back = norm.unnormalize(torch.tensor([0.5, -0.5, 0.7], dtype=torch.float64))
    assert back.tolist() == pytest.approx([0.75 * (4 + 1e-8) - 2, 0.25 * (4 + 1e-8), 0.7])
    assert norm.unnormalize(torch.tensor([-1.0, 1.0, 3.0], dtype=torch.float64)).tolist() == [
        -2.0,
        pytest.approx(4.0),
        3.0,
    ]


def test_bounds_modes_match_numpy_reference_exactly():
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.6, 1.2, (50, 7))
    for mode, (lo_key, hi_key) in {"bounds_q99": ("q01", "q99"), "bounds": ("min", "max")}.items():
        norm = ActionNormalizer(ACTION_STATS, mode, dtype=torch.float64)
        low, high = np.array(ACTION_STATS[lo_key]), np.array(ACTION_STATS[hi_key])
        mask, lo_all, hi_all = np.array(MASK), np.array(MIN), np.array(MAX)
        np.testing.assert_array_equal(
            norm.normalize(torch.from_numpy(x)).numpy(),
            np_normalize_bounds(x, low, high, mask, lo_all, hi_all),
        )
        y = rng.uniform(-1.2, 1.2, (50, 7))
        np.testing.assert_array_equal(
            norm.unnormalize(torch.from_numpy(y)).numpy(), np_unnormalize_oft(y, low, high, mask)
        )
        exact_openvla = ActionNormalizer(ACTION_STATS, mode, eps=0.0, dtype=torch.float64)
        np.testing.assert_array_equal(
            exact_openvla.unnormalize(torch.from_numpy(y)).numpy(),
            np_unnormalize_openvla(y, low, high, mask),
        )


def test_normal_mode_formula_and_round_trip():
    norm = ActionNormalizer(ACTION_STATS, "normal", dtype=torch.float64)
    mean, std = np.array(ACTION_STATS["mean"]), np.array(ACTION_STATS["std"])
    x = np.random.default_rng(2).normal(size=(20, 7))
    y = norm.normalize(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(y, np.where(MASK, (x - mean) / (std + 1e-8), x))
    np.testing.assert_allclose(norm.unnormalize(torch.from_numpy(y)).numpy(), x, rtol=1e-12)
    assert set(norm.state_dict()) == {"mean", "std", "mask"}


@pytest.mark.parametrize("mode", ["bounds_q99", "bounds", "normal"])
def test_round_trip_inside_the_bounds(mode):
    norm = ActionNormalizer(ACTION_STATS, mode)
    low = torch.tensor(MIN if mode == "bounds" else Q01)
    high = torch.tensor(MAX if mode == "bounds" else Q99)
    x = low + (high - low) * torch.rand(4, 8, 7)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(x)), x, atol=1e-6, rtol=1e-5)
    if mode != "normal":
        assert norm.normalize(x)[..., :6].abs().max() <= 1.0


def test_mask_passes_the_gripper_through():
    norm = ActionNormalizer.from_stats(NORM_STATS)
    x = torch.zeros(3, 7)
    x[:, 6] = torch.tensor([0.0, 1.0, 5.0])  # even out of range: unmasked dims are not clipped
    assert norm.normalize(x)[:, 6].tolist() == [0.0, 1.0, 5.0]
    assert norm.unnormalize(x)[:, 6].tolist() == [0.0, 1.0, 5.0]
    all_masked = ActionNormalizer({k: v for k, v in ACTION_STATS.items() if k != "mask"})
    assert all_masked.mask.all() and all_masked.normalize(x)[2, 6] == 1.0


def test_constant_dimensions_normalise_to_zero():
    # proprio dim 6 has min == max: OpenVLA's pipeline maps it to 0 in both bounds modes
    for mode in ("bounds_q99", "bounds"):
        norm = ActionNormalizer.from_stats(NORM_STATS, key="proprio", mode=mode)
        assert norm.constant.tolist() == [False] * 6 + [True]
        x = torch.full((2, 7), 0.3)
        x[1, 6] = 7.0
        assert norm.normalize(x)[:, 6].tolist() == [0.0, 0.0]
    # without min/max the mode's own bounds decide
    norm = ActionNormalizer({"q01": [0.0, 1.0], "q99": [1.0, 1.0]})
    assert norm.constant.tolist() == [False, True]
    assert norm.normalize(torch.tensor([0.5, 1.0])).tolist() == [0.0, 0.0]


def test_proprio_uses_proprio_statistics_and_names_it():
    norm = ActionNormalizer.from_stats(NORM_STATS, "bridge_orig", key="proprio")
    assert norm.name == "proprio"
    torch.testing.assert_close(norm.low, torch.tensor(PROPRIO_STATS["q01"]))
    assert norm.mask.all()  # no mask in the proprio statistics: every dim is normalised
    with pytest.raises(ValueError, match="proprio passed to ActionNormalizer.normalize"):
        norm.normalize(torch.zeros(8))


def test_from_stats_key_resolution():
    two = {"bridge_orig": NORM_STATS["bridge_orig"], "fractal": NORM_STATS["bridge_orig"]}
    assert ActionNormalizer.from_stats(NORM_STATS, None).dim == 7
    with pytest.raises(ValueError, match=r"\['bridge_orig', 'fractal'\]"):
        ActionNormalizer.from_stats(two)
    with pytest.raises(KeyError, match=r"'libero_spatial'.*\['bridge_orig', 'fractal'\]"):
        ActionNormalizer.from_stats(two, "libero_spatial")
    with pytest.raises(KeyError, match=r"no 'state' statistics.*\['action', 'proprio'\]"):
        ActionNormalizer.from_stats(NORM_STATS, key="state")


def test_missing_statistic_and_unknown_mode():
    with pytest.raises(KeyError, match=r"'bounds' needs action statistics \['min', 'max'\]"):
        ActionNormalizer({"q01": Q01, "q99": Q99}, "bounds")
    with pytest.raises(KeyError, match=r"missing \['std'\]"):
        ActionNormalizer({"mean": [0.0]}, "normal")
    with pytest.raises(ValueError, match="unknown normalization mode 'minmax'"):
        ActionNormalizer(ACTION_STATS, "minmax")


@pytest.mark.parametrize(
    "stats, message",
    [
        ({"q01": [0.0, 0.0], "q99": [1.0]}, "differ in length"),
        ({"q01": [0.0, 2.0], "q99": [1.0, 1.0]}, r"'q99' is below 'q01' at dims \[1\]"),
        ({"q01": [0.0, float("nan")], "q99": [1.0, 1.0]}, r"non-finite values at dims \[1\]"),
        ({"q01": [0.0], "q99": [1.0], "mask": [True, False]}, "'mask' has shape"),
        ({"q01": [0.0], "q99": [1.0], "mask": [2]}, "booleans"),
        ({"q01": [], "q99": []}, "non-empty"),
    ],
)
def test_bad_statistics(stats, message):
    with pytest.raises(ValueError, match=message):
        ActionNormalizer(stats)


def test_bad_inputs_name_the_tensor_and_count():
    norm = ActionNormalizer.from_stats(NORM_STATS)
    with pytest.raises(ValueError, match=r"last dimension 6, expected 7"):
        norm.normalize(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="action passed to ActionNormalizer.unnormalize"):
        norm.unnormalize(torch.zeros(4, 8))
    x = torch.zeros(4, 7)
    x[0, 0] = x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="contains 2 NaN and 0 infinite"):
        norm.normalize(x)
    x = torch.zeros(4, 7)
    x[3, 2] = -float("inf")
    with pytest.raises(ValueError, match=r"action passed to .*unnormalize contains 0 NaN and 1"):
        norm.unnormalize(x)
    unchecked = ActionNormalizer.from_stats(NORM_STATS, check_finite=False)
    assert unchecked.unnormalize(x)[3, 2] == -float("inf")


def test_buffers_state_dict_and_dtypes():
    norm = ActionNormalizer.from_stats(NORM_STATS)
    assert set(norm.state_dict()) == {"low", "high", "mask", "constant"}
    assert norm.low.shape == (7,) and norm.mask.dtype == torch.bool
    # a model-wide cast must not round the statistics
    norm.to(torch.bfloat16)
    assert norm.low.dtype == torch.float32
    torch.testing.assert_close(norm.low, torch.tensor(Q01))
    out = norm.normalize(torch.zeros(2, 7, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    assert norm.unnormalize(torch.zeros(7, dtype=torch.float64)).dtype == torch.float64
    # numpy in, tensor out
    assert isinstance(norm.unnormalize(np.zeros((5, 7), np.float32)), torch.Tensor)
    # state dict round trip into a module built from other statistics
    other = ActionNormalizer({"q01": [0.0] * 7, "q99": [1.0] * 7})
    other.load_state_dict(norm.state_dict())
    x = torch.rand(3, 7)
    torch.testing.assert_close(other.normalize(x), norm.normalize(x))
    # devices move (meta stands in for an accelerator)
    assert norm.to("meta").low.device.type == "meta"


def test_load_norm_stats_from_config_and_dataset_statistics(tmp_path):
    config = {"model_type": "openvla", "n_action_bins": 256, "norm_stats": NORM_STATS}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_norm_stats(tmp_path / "config.json") == NORM_STATS
    assert load_norm_stats(tmp_path) == NORM_STATS
    stats_dir = tmp_path / "finetuned"
    stats_dir.mkdir()
    (stats_dir / "dataset_statistics.json").write_text(json.dumps(NORM_STATS))
    assert load_norm_stats(stats_dir / "dataset_statistics.json") == NORM_STATS
    assert load_norm_stats(str(stats_dir)) == NORM_STATS

    (tmp_path / "other.json").write_text(json.dumps({"hidden_size": 4096}))
    with pytest.raises(ValueError, match="hidden_size"):
        load_norm_stats(tmp_path / "other.json")
    (tmp_path / "empty.json").write_text(json.dumps({"norm_stats": None}))
    with pytest.raises(ValueError, match="empty 'norm_stats'"):
        load_norm_stats(tmp_path / "empty.json")
    with pytest.raises(FileNotFoundError):
        load_norm_stats(tmp_path / "missing.json")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"hidden_size": 4096}))
    with pytest.raises(FileNotFoundError, match="dataset_statistics.json"):
        load_norm_stats(bare)


def test_openvla_predict_pipeline_matches_numpy(tmp_path):
    """Token ids -> bin centres -> unnormalised actions, as OpenVLA's predict_action."""
    (tmp_path / "config.json").write_text(json.dumps({"norm_stats": NORM_STATS}))
    norm = ActionNormalizer.from_stats(
        load_norm_stats(tmp_path), "bridge_orig", eps=0.0, dtype=torch.float64
    )
    tok = ActionTokenizer(vocab_end=32000, action_dim=7)
    ids = torch.randint(31744, 32000, (16, 7))
    ours = norm.unnormalize(tok.decode(ids, dtype=torch.float64))
    reference = np_unnormalize_openvla(
        np_decode(ids.numpy()), np.array(Q01), np.array(Q99), np.array(MASK)
    )
    np.testing.assert_array_equal(ours.numpy(), reference)
