"""The training recipe as a library function and as ``vlakit train --model pkg.mod:build``:
a policy bundle at each save and at the end, two processes (gloo) equal to one, resume
bit-identical, bad set-ups refused before any step."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VLAKIT_TYPECHECK": "0",
       "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    from test_lerobot_data import write_dataset

    return write_dataset(tmp_path_factory.mktemp("recipe") / "dataset")


def _cli(out, data, *args, processes=1):
    # chunk 1: no padded steps. With padded steps each process averages its loss over its
    # own real steps, which weighs examples otherwise than one process's mean over all of
    # them (a known difference, noted in docs/scaling.md)
    command = [sys.executable, "-m", "vlakit", "train", "--model", "recipe_builders:tiny_oft",
               "--data", str(data), "--chunk", "1", "--steps", "4", "--batch", "4",
               "--out", str(out), *args]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "-m", *command[2:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV,
                          cwd=TESTS)


def test_train_in_process_writes_a_bundle_at_each_save_and_at_the_end(dataset_folder,
                                                                    tmp_path):
    from recipe_builders import tiny_oft

    from vlakit.bundle import PolicyBundle
    from vlakit.data import LeRobotDataset
    from vlakit.processors import OPENVLA_PROMPT, word_tokenizer
    from vlakit.recipe import TrainOptions, train

    data = LeRobotDataset(dataset_folder, chunk_size=2)
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *data.tasks.values()])
    torch.manual_seed(0)
    lines = []
    options = TrainOptions(steps=4, batch=4, out=tmp_path, save_every=2)
    policy = train(tiny_oft, data, tokenizer, options, log=lines.append)  # a builder
    assert policy == tmp_path / "policy" and "last loss" in lines[-1]
    assert (tmp_path / "loss.csv").is_file() and (tmp_path / "loss.png").is_file()
    bundle = PolicyBundle.load(policy)
    frame = {key: np.zeros((32, 32, 3), np.uint8) for key in bundle.keys.images}
    frame |= {bundle.keys.state: np.zeros(3, np.float32), bundle.keys.prompt: "pick the cup"}
    assert bundle(frame).shape == (2, 2)


def test_the_command_trains_resumes_exactly_and_two_processes_equal_one(dataset_folder,
                                                                       tmp_path):
    reference = _cli(tmp_path / "reference", dataset_folder)
    assert reference.returncode == 0, reference.stderr[-3000:]
    first = _cli(tmp_path / "resumed", dataset_folder, "--save-every", "2", "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "resumed" / "policy" / "policy.json").is_file()  # a bundle at the save
    # the resumed half reads the frames held in memory: the same samples, the same weights
    resumed = _cli(tmp_path / "resumed", dataset_folder, "--resume", "--preload")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "reference" / "final_weights.pt")
    b = torch.load(tmp_path / "resumed" / "final_weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "reference" / "loss.csv").read_text() == \
        (tmp_path / "resumed" / "loss.csv").read_text()
    fsdp = _cli(tmp_path / "fsdp", dataset_folder, "--strategy", "fsdp", processes=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    c = torch.load(tmp_path / "fsdp" / "final_weights.pt")
    for key in a:
        torch.testing.assert_close(c[key].float(), a[key].float(), atol=1e-4, rtol=0, msg=key)


def test_bad_set_ups_fail_before_any_step(dataset_folder, tmp_path):
    done = _cli(tmp_path, dataset_folder, "--batch", "6", "--accum", "4")
    assert done.returncode != 0 and "not divisible by world size 1 x --accum 4" in done.stderr
    done = _cli(tmp_path, dataset_folder, "--strategy", "ddp")
    assert done.returncode != 0 and "needs torchrun" in done.stderr
    assert not (tmp_path / "checkpoint").exists()
    for spec, message in (("recipe_builders", "expected 'package.module:function'"),
                          ("no_such_module:build", "cannot import"),
                          ("recipe_builders:missing", "has no 'missing'"),
                          ("recipe_builders:NOT_A_BUILDER", "not a callable")):
        command = [sys.executable, "-m", "vlakit", "train", "--model", spec, "--data",
                   str(dataset_folder), "--out", str(tmp_path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV,
                              cwd=TESTS)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
