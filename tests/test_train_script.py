"""examples/train.py, the training recipe: exact resume on CPU, and 2-process torchrun runs
(gloo) of DDP and FSDP2 that equal the single-process run; set-ups that cannot work fail
before any step."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VLAKIT_TYPECHECK": "0"}


def _train(out, *args, processes=1):
    command = [sys.executable, str(EXAMPLES / "train.py"), "--steps", "4", "--batch", "8",
               "--out", str(out), *args]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *command[1:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV,
                          cwd=EXAMPLES)
    return done


def _weights(out):
    return torch.load(Path(out) / "final_weights.pt")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    done = _train(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_resume_continues_bit_identically(single, tmp_path):
    reference, _ = single
    first = _train(tmp_path, "--save-every", "2", "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "checkpoint" / "progress.json").exists()
    assert not (tmp_path / "checkpoint.tmp").exists()  # written under a temporary name
    resumed = _train(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(reference), _weights(tmp_path)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows == (reference / "loss.csv").read_text().splitlines() and len(rows) == 5
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(single, tmp_path, strategy):
    reference, stdout = single
    done = _train(tmp_path, "--strategy", strategy, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    last = re.search(r"last loss ([0-9.]+)", done.stdout)
    assert last and abs(float(last[1]) - float(re.search(r"last loss ([0-9.]+)", stdout)[1])) \
        < 1e-4, done.stdout
    a, b = _weights(reference), _weights(tmp_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=1e-4, rtol=0, msg=key)


def test_bad_setups_fail_before_any_step(tmp_path):
    done = _train(tmp_path, "--batch", "6", "--accum", "4")
    assert done.returncode != 0 and "not divisible by world size 1 x --accum 4" in done.stderr
    done = _train(tmp_path, "--strategy", "ddp")
    assert done.returncode != 0 and "needs torchrun" in done.stderr
    assert not (tmp_path / "checkpoint").exists()


def test_training_on_a_lerobot_folder_and_resuming_another_composition(tmp_path):
    from test_lerobot_data import write_dataset

    data = write_dataset(tmp_path / "dataset")
    out = tmp_path / "run"
    done = _train(out, "--data", str(data), "--chunk", "2", "--batch", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"last loss [0-9.]+", done.stdout)
    # the synthetic task's model is another composition: refused before any step
    other = _train(out, "--resume", "--batch", "4")
    assert other.returncode != 0
    assert "cannot resume from" in other.stderr and "another composition" in other.stderr
    assert (out / "checkpoint" / "progress.json").exists()  # the checkpoint is untouched
