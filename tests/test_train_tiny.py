"""examples/train_tiny.py trains a tiny OpenVLA-OFT-style model on CPU: the loss falls, the
held-out error is reported against a threshold and a baseline, and the loss curve is saved."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_tiny.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(cwd: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                            text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _losses(out: str) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in re.findall(r"^step +(\d+) +loss ([0-9.]+)$", out, re.M)]


def _held_out(out: str) -> tuple[float, float, float]:
    """(error, threshold, mean-action baseline) from the script's summary line."""
    match = re.search(
        r"held-out mean absolute error: ([0-9.]+) \(threshold ([0-9.]+); "
        r"predicting the mean action: ([0-9.]+)\)", out)
    assert match, out
    return tuple(float(x) for x in match.groups())


def test_a_short_run_lowers_the_loss_and_writes_the_plot(tmp_path):
    """200 steps (about 25 s): the loss falls well below its first value and the held-out
    error is already below the mean-action baseline; the PNG lands at --out."""
    out_png = tmp_path / "curve.png"
    out = _run(tmp_path, "--steps", "200", "--out", str(out_png), "--seed", "0")
    losses = _losses(out)
    assert [s for s, _ in losses] == [1, 100, 200], out
    first, last = losses[0][1], losses[-1][1]
    assert last < first / 2, out
    final = float(re.search(r"final loss \(mean of the last 20 steps\): ([0-9.]+)", out)[1])
    assert final < first / 2, out
    error, threshold, baseline = _held_out(out)
    assert 0 < error < baseline and threshold < baseline, out
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote the loss curve to {out_png}" in out
    assert not (tmp_path / "train_tiny_loss.png").exists()  # --out was honoured


@pytest.mark.slow
def test_the_full_run_learns_the_task(tmp_path):
    """The default 800 steps (about 2 minutes): the held-out error falls below the stated
    threshold, a small fraction of the mean-action baseline; the default --out is written
    in the working directory."""
    out = _run(tmp_path)
    error, threshold, baseline = _held_out(out)
    assert error < threshold, out
    assert error < baseline / 5, out
    assert "learned the task" in out
    losses = _losses(out)
    assert losses[-1][0] == 800 and losses[-1][1] < losses[0][1] / 20, out
    assert (tmp_path / "train_tiny_loss.png").read_bytes()[:8] == PNG_MAGIC
