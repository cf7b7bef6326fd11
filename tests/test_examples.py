"""The examples run and print what the README promises (they must not rot)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "script, expected",
    [
        ("quickstart.py", "predicted unnormalised actions (2, 1, 7)"),
        ("paligemma_3b.py", "2,923,466,480"),
        ("openvla_7b.py", "7,541,237,184"),
        ("swap_components.py", "swapped (SigLIP only, Gemma)"),
    ],
)
def test_example_runs(script, expected):
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                            text=True, timeout=300, cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
