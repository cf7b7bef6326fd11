"""FSDP2 (world size 1, gloo): sharded training step and prediction equal the unsharded model."""

import os
import subprocess
import sys

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def test_fully_shard_vla_matches_unsharded_loss_gradients_and_actions():
    # A fresh process: the process group is process-wide state.
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "fsdp_world1.py")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLAKIT_TYPECHECK": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tied=True" in done.stdout and "FSDP2 OK" in done.stdout
    assert "wrapped timm + transformers" in done.stdout
    assert "prefix-trained expert head" in done.stdout
    assert "target action tokens unchanged" in done.stdout
    assert "parallelize with activation checkpointing: loss and gradients equal" in done.stdout
    assert "oft_lora under FSDP2: loss and gradients equal" in done.stdout
    assert "built on meta, sharded, then materialised: a training step runs" in done.stdout
    for head in ("l1/bidirectional", "diffusion/parallel", "flow/parallel",
                 "l1/bidirectional + LightVLAPruner", "flow/parallel + TopKPruner",
                 "l1/causal + FastVPruner"):
        assert f"continuous head {head}: loss, gradients and actions equal" in done.stdout


def test_shard_units_are_vision_blocks_then_decoder_layers():
    from _tiny import VOCAB_SIZE

    from vlakit import VLA
    from vlakit.core import CausalMask
    from vlakit.decoders import llama
    from vlakit.distributed import shard_units
    from vlakit.interleave import PrefixInterleaver
    from vlakit.projectors import LinearProjector
    from vlakit.vision import vit

    model = VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=3, num_heads=4, mlp_dim=64),
        LinearProjector(32, 64), PrefixInterleaver(bos_id=1, eos_id=2),
        llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
        CausalMask(),
    )
    units = shard_units(model)
    assert units == [*model.encoder.blocks, *model.decoder.layers]
