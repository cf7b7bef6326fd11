"""FSDP2 applied by hand (world size 1, gloo), torchtitan's habit: what works trains to the
unsharded numbers (per layer then the root; the embedding, layers and LM head as units), and
what cannot work names the method that runs outside forward and points at
``fully_shard_vla`` instead of failing with a DTensor error."""

import os
import subprocess
import sys

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def test_sharding_by_hand_trains_or_points_at_fully_shard_vla():
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "fsdp_manual.py")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLAKIT_TYPECHECK": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for line in ("layers then root: a training step equals the unsharded one; predict_action "
                 "and generate name fully_shard_vla",
                 "layers, decoder, root: the step names embed_tokens and fully_shard_vla",
                 "embedding, layers, LM head, root: a training step equals the unsharded one",
                 "fully_shard_vla: training, predict_action and generate pass every check",
                 "manual FSDP2 OK"):
        assert line in done.stdout, done.stdout


def test_check_gathered_passes_modules_that_are_not_sharded():
    import torch

    from vlakit.core import check_gathered
    from vlakit.decoders import llama

    decoder = llama(vocab_size=64, dim=32, num_layers=1, num_heads=2, mlp_dim=64)
    check_gathered(decoder, "embed_tokens")  # not sharded: nothing to check
    check_gathered(torch.nn.Linear(2, 2), "forward")
