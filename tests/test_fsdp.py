"""FSDP2 (world size 1, gloo): sharded training step and prediction equal the unsharded
model, with no "returned a view tensor" warnings; the sharding units."""

import os
import subprocess
import sys

import torch

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
    for variant in ("pi0", "pi05"):
        assert f"{variant} + pi0_lora under FSDP2: loss" in done.stdout
    assert "built on meta, sharded, then materialised: a training step runs" in done.stdout
    # every step above ran with FSDP2's view warning turned into an error
    assert "no view-tensor warnings" in done.stdout
    assert "returned a view tensor" not in done.stderr
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


def test_shard_units_take_every_layer_stack_by_type():
    """A head's action expert (a bare LayerStack, pi0's shape) is sharded per layer too,
    after the decoder's layers."""
    from _tiny import VOCAB_SIZE

    from vlakit import VLA
    from vlakit.core import CausalMask
    from vlakit.decoders import LayerStack, gemma_stack, llama
    from vlakit.distributed import shard_units
    from vlakit.interleave import PrefixInterleaver
    from vlakit.projectors import LinearProjector
    from vlakit.vision import vit

    class ExpertHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expert = gemma_stack(dim=32, num_layers=3, num_heads=2, num_kv_heads=1,
                                      head_dim=16, mlp_dim=64)

    model = VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, 64), PrefixInterleaver(bos_id=1, eos_id=2),
        llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
        CausalMask(),
    )
    model.head = ExpertHead()
    assert type(model.head.expert) is LayerStack
    units = shard_units(model)
    assert units == [*model.encoder.blocks, *model.decoder.layers, *model.head.expert.layers]
