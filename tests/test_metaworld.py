"""The Meta-World closed loop in seconds (benchmarks/metaworld/run.py smoke): one scripted
demonstration written as a LeRobot v3 folder, the VLA trained for 3 steps with
``vlakit train``, the baseline for 2 s, one held-out episode each through ``vlakit serve``
and the real openpi client and in process. It keeps the benchmark from rotting; the
benchmark itself (README there) is not part of the test run."""

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("metaworld")
pytest.importorskip("openpi_client")
if ctypes.util.find_library("OSMesa") is None:
    pytest.skip("off-screen rendering needs OSMesa: apt-get install libosmesa6",
                allow_module_level=True)

from vlakit.bundle import PolicyBundle  # noqa: E402
from vlakit.data import LeRobotDataset  # noqa: E402

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "metaworld" / "run.py"


def test_smoke_collect_train_serve_evaluate(tmp_path):
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    done = subprocess.run([sys.executable, str(RUN), "smoke", "--work", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    task = "reach-v3"
    assert report["collect"]["episodes"] == {task: 1}
    data = LeRobotDataset(tmp_path / "demos", chunk_size=4)
    assert data.cameras == ["observation.images.corner"] and data.state_dim == 39
    assert data.tasks == {0: "reach the goal"} and len(data) > 10
    assert data[0]["images"].shape == (1, 3, 64, 64)
    bundle = PolicyBundle.load(tmp_path / "vla" / "policy")
    assert bundle.model.head.chunk_size == 4 and bundle.model.head.action_dim == 4
    assert report["train"]["baseline"]["steps"] >= 1
    assert report["expert"]["tasks"][task]["success"] == 1.0  # the scripted expert, seed 10000
    for name in ("vla", "baseline"):
        assert report[name]["tasks"][task]["episodes"] == 1
        assert 0.0 <= report[name]["tasks"][task]["success"] <= 1.0
    assert (tmp_path / "success.png").stat().st_size > 1000
