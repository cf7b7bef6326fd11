"""examples/train.py, the training recipe: exact resume on CPU (one process, and two with
an iterative head whose training noise comes from a generator the checkpoint saves), and
2-process torchrun runs (gloo) of DDP and FSDP2 that equal the single-process run; set-ups
that cannot work fail before any step; the loss plot is labelled with the head's loss."""

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


def test_the_run_saves_a_policy_bundle_with_its_tokenizer(single):
    """The recipe's artefact is the bundle (the tokenizer included: another tokenizer of the
    same size would give other prompts), loadable in one call, with the trained weights."""
    import numpy as np

    from vlakit.bundle import PolicyBundle

    out, _ = single
    policy = PolicyBundle.load(out / "policy")
    assert (out / "policy" / "tokenizer" / "tokenizer.json").is_file()
    weights = _weights(out)
    for key, value in policy.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    views = policy.model.num_views or 1
    g = np.random.default_rng(0)
    observation = {key: g.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                   for key in policy.keys.images[:views]}
    if policy.keys.state is not None:
        observation[policy.keys.state] = np.zeros(policy.model.proprio_projector.in_dim,
                                                  np.float32)
    observation[policy.keys.prompt] = "pick up the cup"
    chunk = policy(observation)
    assert chunk.shape == (policy.model.head.chunk_size, policy.model.head.action_dim)


@pytest.mark.parametrize(("strategy", "head"), [("fsdp", "flow"), ("ddp", "diffusion")])
def test_two_process_resume_of_an_iterative_head_is_exact(tmp_path, strategy, head):
    """Flow matching and diffusion draw noise and times in every training step: from one
    generator per process that the checkpoint saves (with torch's global random state) and
    the resumed run restores, so the resumed losses and weights are the uninterrupted
    run's, bit for bit."""
    reference = tmp_path / "reference"
    done = _train(reference, "--strategy", strategy, "--head", head, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    label = {"flow": "flow-matching velocity MSE", "diffusion": "noise-prediction MSE"}[head]
    assert label in done.stdout, done.stdout  # the plot's label follows the head
    out = tmp_path / "resumed"
    first = _train(out, "--strategy", strategy, "--head", head, "--save-every", "2",
                   "--stop-after", "2", processes=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert {p.name for p in (out / "checkpoint").glob("random-*.pt")} == {"random-0.pt",
                                                                          "random-1.pt"}
    resumed = _train(out, "--strategy", strategy, "--head", head, "--resume", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows == (reference / "loss.csv").read_text().splitlines() and len(rows) == 5
    a, b = _weights(reference), _weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if strategy == "fsdp":  # each process's generator is saved: another count is refused
        other = _train(out, "--head", head, "--resume")
        assert other.returncode != 0
        assert ("it was written by 2 processes and this run has 1" in other.stderr
                and "--nproc_per_node=2" in other.stderr), other.stderr[-3000:]


def test_the_loss_label_follows_the_head(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import train

    from vlakit.actions import ActionTokenizer
    from vlakit.heads import DiscreteActionHead, NextTokenHead
    from vlakit.models import oft_head

    assert train.loss_label(oft_head("l1", 8, 2, 3)) == "training loss (L1, normalised actions)"
    assert "flow-matching velocity MSE" in train.loss_label(oft_head("flow", 8, 2, 3))
    assert "diffusion noise-prediction MSE" in train.loss_label(oft_head("diffusion", 8, 2, 3))
    tokens = DiscreteActionHead(ActionTokenizer(vocab_end=300, action_dim=3))
    assert "action-token cross-entropy" in train.loss_label(tokens)
    assert "next-token cross-entropy" in train.loss_label(NextTokenHead())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(single, tmp_path, strategy):
    reference, stdout = single
    done = _train(tmp_path, "--strategy", strategy, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "returned a view tensor" not in done.stderr  # FSDP2's warning: no unit returns one
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
