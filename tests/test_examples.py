"""The examples run and print what the README promises (they must not rot)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                            text=True, timeout=300, cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize(
    "script, expected",
    [
        ("paligemma_3b.py", "2,923,466,480"),
        ("openvla_7b.py", "7,541,237,184"),
        ("openvla_oft.py", "total                      7,709,173,191"),
        ("swap_components.py", "swapped (SigLIP only, Gemma)"),
    ],
)
def test_example_runs(script, expected):
    assert expected in _run(script)


def test_quickstart_overfits_and_predicts_the_targets():
    """The quickstart memorises one batch: the loss falls and the predicted actions come
    back within half an action bin of the targets (seeded, so the numbers are stable)."""
    out = _run("quickstart.py")
    assert "predicted unnormalised actions (2, 1, 7) vs targets:" in out
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss ([0-9.]+)$", out, re.M)]
    assert len(losses) >= 3 and losses[-1] < losses[0] / 10, out
    predicted = [eval(x) for x in re.findall(r"predicted (\[.*\])", out)]
    target = [eval(x) for x in re.findall(r"target +(\[.*\])", out)]
    assert len(predicted) == len(target) == 2, out
    for p, t in zip(predicted, target):
        # bins: 0.0004 wide for the arm, 0.0078 for the (unnormalised) gripper
        assert max(abs(a - b) for a, b in zip(p, t)) < 0.005, out
    difference = float(re.search(r"largest difference: ([0-9.]+)", out).group(1))
    assert difference < 0.005, out


def test_openvla_oft_example_predicts_a_chunk_with_every_head():
    out = _run("openvla_oft.py")
    for head, layout in [("L1RegressionHead", "one pass"), ("DiffusionActionHead", "oft"),
                         ("DiffusionActionHead", "cached"), ("FlowMatchingHead", "cached")]:
        assert re.search(rf"{head} +attention=\w+ +layout={layout} +actions \(3, 8, 7\)", out), out


def test_lightvla_example_prunes_a_padded_batch_and_draws_the_kept_patches(tmp_path):
    out_png = tmp_path / "kept.png"
    result = subprocess.run([sys.executable, str(EXAMPLES / "lightvla.py"), "--out",
                             str(out_png)], capture_output=True, text=True, timeout=300,
                            cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "LightVLA-7B on the meta device: 7,709,173,191 parameters" in out
    kept = [int(k) for k in re.findall(r"kept (\d+)/32 image tokens", out)]
    assert len(kept) == 3 and all(0 < k < 32 for k in kept), out
    assert re.search(r"1 view, same model: actions \(3, 8, 7\), kept [0-9.]+% of 16", out), out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_checkpoints_example_loads_every_format():
    out = _run("load_checkpoints.py")
    assert re.search(r"PaliGemma \(\d+ shards\): loaded 64 tensors .* max \|logits - "
                     r"transformers\| = (\d\.\d+e-0[5-9]|0\.00e\+00)", out), out
    assert re.search(r"OpenVLA \(2 bf16 shards\): loaded \d+ tensors .*skipped \d+ unused keys",
                     out), out
    assert "OpenVLA-OFT (L1RegressionHead, chunk 8 from the dataset name, proprio 5): actions " \
           "(1, 8, 3)" in out, out
    assert re.search(r"LightVLA: kept \d+ of 8 image tokens", out), out
    assert re.search(r"OpenVLA \+ LoRA adapter \(merged\): loaded \d+ tensors", out), out
    assert "['model.safetensors', 'vlakit.json'], same weights: True" in out, out
    diff = float(re.search(r"max \|actions diff\| = ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-5, out


def test_pi0_example_prints_the_counts_beside_the_references_and_predicts():
    out = _run("pi0.py")
    assert re.search(r"total +3,128,992,528 +3,238,048,528 +4,028,019,472", out), out
    assert re.search(r"total +3,243,328,272 +3,353,433,872 +4,143,404,816", out), out
    assert "keeps the final norm's gate rows: 3,244,377,872" in out, out
    assert re.search(r"tiny pi0: [\d,]+ parameters, actions \(3, 10, 7\)", out), out
    assert re.search(r"tiny pi0\.5: [\d,]+ parameters, actions \(3, 10, 7\)", out), out
