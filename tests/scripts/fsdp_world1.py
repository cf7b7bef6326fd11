"""World-size-1 gloo FSDP2 run: a training step and predict_action, sharded vs unsharded.

Run by tests/test_fsdp.py in a fresh process (a process group is process-wide state).
Exits non-zero with a message on any difference.
"""

import copy
import os
import socket
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _tiny import ACTION_VOCAB_END, VOCAB_SIZE  # noqa: E402

from vlakit import VLA, VLAInputs  # noqa: E402
from vlakit.actions import ActionNormalizer, ActionTokenizer  # noqa: E402
from vlakit.core import CausalMask  # noqa: E402
from vlakit.decoders import llama  # noqa: E402
from vlakit.distributed import fully_shard_vla  # noqa: E402
from vlakit.heads import DiscreteActionHead  # noqa: E402
from vlakit.interleave import PrefixInterleaver  # noqa: E402
from vlakit.projectors import MLPProjector  # noqa: E402
from vlakit.vision import vit  # noqa: E402


def build(tied: bool) -> VLA:
    torch.manual_seed(0)
    return VLA(
        encoder=vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64),
        projector=MLPProjector([32, 64, 64]),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, mlp_dim=128, tie_embeddings=tied),
        mask_policy=CausalMask(),
        head=DiscreteActionHead(ActionTokenizer(vocab_end=ACTION_VOCAB_END, action_dim=3),
                                chunk_size=2),
        action_normalizer=ActionNormalizer({"q01": [-1.0] * 3, "q99": [1.0] * 3}),
    )


def batch() -> VLAInputs:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 5), generator=g)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return VLAInputs(
        input_ids=ids, text_valid=valid,
        pixels=torch.randn(2, 1, 3, 28, 28, generator=g),
        actions=torch.rand(2, 2, 3, generator=g) * 2 - 1,
    )


def training_step_matches(reference, sharded, inputs):
    """One forward/backward on both models: equal loss and every gradient equal."""
    loss_ref = reference(inputs).loss
    loss_ref.backward()
    loss = sharded(inputs).loss
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, param in sharded.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
    return loss_ref, loss, grads


def check(tied: bool) -> None:
    reference = build(tied)
    sharded = fully_shard_vla(copy.deepcopy(reference))
    inputs = batch()
    loss_ref, loss, grads = training_step_matches(reference, sharded, inputs)
    predict = VLAInputs(input_ids=inputs.input_ids, text_valid=inputs.text_valid,
                        pixels=inputs.pixels)
    torch.testing.assert_close(sharded.predict_action(predict), reference.predict_action(predict),
                               rtol=0, atol=0)
    torch.testing.assert_close(sharded.generate(predict, 3), reference.generate(predict, 3),
                               rtol=0, atol=0)
    # every public path works on a freshly sharded model, not only the registered ones
    fresh = fully_shard_vla(copy.deepcopy(reference))
    runner = fresh.runner(predict)
    torch.testing.assert_close(runner.generate(3), reference.generate(predict, 3), rtol=0, atol=0)
    torch.testing.assert_close(fresh.runner(predict).image_tokens,
                               reference.runner(predict).image_tokens)
    prefix = runner.prefix()
    assert prefix.batch_size == 2
    torch.testing.assert_close(fresh(inputs).loss, loss_ref, rtol=0, atol=1e-6)
    print(f"tied={tied}: loss {loss.item():.6f}, {len(grads)} gradients, actions equal")


def check_wrapped() -> None:
    """A timm encoder and a transformers decoder: per-block units inside the wrapped models."""
    from _tiny import tiny_decoder, tiny_encoder

    from vlakit.distributed import shard_units
    from vlakit.projectors import LinearProjector

    torch.manual_seed(0)
    encoder = tiny_encoder("timm")
    reference = VLA(
        encoder, LinearProjector(encoder.dim, 64), PrefixInterleaver(bos_id=1, eos_id=2),
        tiny_decoder("hf", dim=64), CausalMask(),
        head=DiscreteActionHead(ActionTokenizer(vocab_end=ACTION_VOCAB_END, action_dim=3),
                                chunk_size=2),
    )
    names = [type(u).__name__ for u in shard_units(reference)]
    assert names == ["Block", "Block", "LlamaDecoderLayer", "LlamaDecoderLayer"], names
    sharded = fully_shard_vla(copy.deepcopy(reference))
    inputs = batch()
    inputs.pixels = torch.randn(2, 1, 3, 28, 28)
    loss_ref, loss, grads = training_step_matches(reference, sharded, inputs)
    print(f"wrapped timm + transformers: loss {loss.item():.6f}, {len(grads)} gradients equal")


class ExpertHead(torch.nn.Module):
    """pi0's shape at toy size: an action expert trained against the prefix cache."""

    num_action_tokens = 6
    chunk_size, action_dim = 2, 3

    def __init__(self) -> None:
        super().__init__()
        self.expert = llama(vocab_size=8, dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                            head_dim=16, mlp_dim=64)
        self.out = torch.nn.Linear(32, 1)

    def has_targets(self, inputs):
        return inputs.actions is not None

    def _actions(self, runner):
        from vlakit.core import TokenRole

        slots = torch.zeros(runner.batch_size, self.num_action_tokens, 32)
        hidden = runner.prefix().run_suffix(slots, TokenRole.ACTION, decoder=self.expert)
        return self.out(hidden).reshape(-1, 2, 3)

    def loss(self, runner, sampling):
        return (self._actions(runner) - runner.target_actions()).abs().mean()

    def predict(self, runner, sampling):
        return self._actions(runner)


def check_prefix_trained_and_mixed_precision() -> None:
    """A head trained through the prefix cache (backward reaches every sharded layer), and
    a bf16 mixed-precision policy that must not round the target actions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from vlakit.core import RoleBlockMask, TokenRole

    reference = build(tied=False)
    reference.head = ExpertHead()
    reference.mask_policy = RoleBlockMask(
        [{TokenRole.BOS, TokenRole.IMAGE, TokenRole.TEXT}, {TokenRole.ACTION}])
    sharded = fully_shard_vla(copy.deepcopy(reference))
    inputs = batch()
    loss_ref, loss, grads = training_step_matches(reference, sharded, inputs)
    print(f"prefix-trained expert head: loss {loss.item():.6f}, {len(grads)} gradients equal")

    reference = build(tied=False)
    reference.action_normalizer = ActionNormalizer({"q01": [-0.05] * 3, "q99": [0.05] * 3})
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    mixed = fully_shard_vla(copy.deepcopy(reference), mp_policy=policy)
    g = torch.Generator().manual_seed(2)
    many = VLAInputs(  # 16 rows of small raw actions, as real robot data has
        input_ids=torch.randint(3, 100, (16, 5), generator=g),
        text_valid=torch.ones(16, 5, dtype=torch.bool),
        pixels=torch.randn(16, 1, 3, 28, 28, generator=g),
        actions=(torch.rand(16, 2, 3, generator=g) - 0.5) * 0.1,
    )
    ids_ref = reference(many).sequence.token_ids
    ids = mixed(many).sequence.token_ids
    assert torch.equal(ids, ids_ref), "bf16 mixed precision moved the target action tokens"
    print("bf16 mixed precision: target action tokens unchanged")


def check_continuous_heads() -> None:
    """L1, diffusion (cached prefix) and flow heads, and pruners (LightVLA's training mix
    and evaluation set, TopK before a cached prefix, FastV between layers): a sharded
    training step and sampled predictions equal the unsharded model's (same seeds)."""
    from vlakit.models import oft_head, oft_mask
    from vlakit.projectors import ProprioProjector
    from vlakit.pruners import FastVPruner, LightVLAPruner, TopKPruner

    for head, attention, pruner in [
        ("l1", "bidirectional", None), ("diffusion", "parallel", None),
        ("flow", "parallel", None), ("l1", "bidirectional", LightVLAPruner(noise_scale=0.5)),
        ("flow", "parallel", TopKPruner(0.5)), ("l1", "causal", FastVPruner(1, 0.5)),
    ]:
        torch.manual_seed(0)
        reference = VLA(
            encoder=vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64),
            projector=MLPProjector([32, 64, 64]),
            interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
            decoder=llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, mlp_dim=128),
            mask_policy=oft_mask(attention),
            head=oft_head(head, 64, 2, 3, attention, num_inference_steps=3),
            proprio_projector=ProprioProjector(4, 64),
            pruner=pruner,
        )
        sharded = fully_shard_vla(copy.deepcopy(reference))
        inputs = batch()
        inputs.proprio = torch.randn(2, 4)
        torch.manual_seed(5)
        loss_ref = reference(inputs).loss
        loss_ref.backward()
        torch.manual_seed(5)
        loss = sharded(inputs).loss
        loss.backward()
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
        grads = {n: p.grad for n, p in reference.named_parameters()}
        for name, param in sharded.named_parameters():
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
        predict = VLAInputs(input_ids=inputs.input_ids, text_valid=inputs.text_valid,
                            pixels=inputs.pixels, proprio=inputs.proprio)
        n = 2 if head != "l1" else None
        reference.eval(), sharded.eval()
        from vlakit.heads import Sampling

        def sampling(n=n):
            return Sampling(num_samples=n, generator=torch.Generator().manual_seed(6))

        want = reference.predict_action(predict, sampling())
        got = sharded.predict_action(predict, sampling())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        name = "" if pruner is None else f" + {type(pruner).__name__}"
        print(f"continuous head {head}/{attention}{name}: loss, gradients and actions equal")


def check_parallelize_with_activation_checkpointing() -> None:
    """parallelize(model, activation_checkpointing=True): FSDP2 units that recompute their
    activations give the unsharded model's loss and gradients."""
    from vlakit.distributed import parallelize

    reference = build(tied=False)
    sharded = parallelize(copy.deepcopy(reference), activation_checkpointing=True)
    inputs = batch()
    training_step_matches(reference, sharded, inputs)
    print("parallelize with activation checkpointing: loss and gradients equal")


def check_lora_and_meta_materialisation() -> None:
    """OFT's LoRA recipe under FSDP2 equals the unsharded LoRA model; and a model built on
    meta, parallelized, then materialised (torchtitan's order) trains."""
    from vlakit.core import init_parameters
    from vlakit.distributed import oft_lora, parallelize

    reference = build(tied=False)
    oft_lora(reference, rank=4)
    sharded = parallelize(copy.deepcopy(reference))
    training_step_matches(reference, sharded, batch())
    print("oft_lora under FSDP2: loss and gradients equal")
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = build(tied=True)
    parallelize(meta, activation_checkpointing=True)
    meta.to_empty(device="cpu")
    init_parameters(meta)
    loss = meta(batch()).loss
    loss.backward()
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for p in meta.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and len(grads) > 10, len(grads)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    print("built on meta, sharded, then materialised: a training step runs")


def check_pi0_lora() -> None:
    """pi0 / pi0.5 with openpi's LoRA recipe under FSDP2 (PaliGemma layers and the expert's
    layers as units) equal the unsharded model: loss with given draws, every gradient and
    the predicted actions."""
    from test_pi0_parity import CHUNK, MAX_DIM, _inputs, _tiny

    from vlakit.distributed import parallelize, pi0_lora
    from vlakit.heads import Sampling

    for variant in ("pi0", "pi05"):
        reference = _tiny(variant).train()
        pi0_lora(reference)
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        sharded = parallelize(copy.deepcopy(reference))
        g = torch.Generator().manual_seed(7)
        draws = dict(noise=torch.randn(3, CHUNK, MAX_DIM, generator=g),
                     time=torch.tensor([0.2, 0.5, 0.9]))
        inputs = _inputs(variant == "pi0", actions=True, pad=True)
        loss_ref = reference(inputs, sampling=Sampling(**draws)).loss
        loss_ref.backward()
        loss = sharded(inputs, sampling=Sampling(**draws)).loss
        loss.backward()
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
        grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        for name, param in sharded.named_parameters():
            if param.grad is None:
                assert name not in grads, name
                continue
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
        predict = _inputs(variant == "pi0")
        noise = Sampling(noise=draws["noise"])
        torch.testing.assert_close(sharded.eval().predict_action(predict, noise),
                                   reference.eval().predict_action(predict, noise))
        print(f"{variant} + pi0_lora under FSDP2: loss, {len(grads)} gradients and actions "
              f"equal")


def main() -> None:
    # FSDP2 warns when a unit returns a view (an in-place op on it would drop the backward
    # all-gather hook); fully_shard_vla leaves none: any such warning fails the run
    warnings.filterwarnings("error", message=r".*returned a view tensor")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        check(tied=False)
        check(tied=True)
        check_wrapped()
        check_prefix_trained_and_mixed_precision()
        check_continuous_heads()
        check_parallelize_with_activation_checkpointing()
        check_lora_and_meta_materialisation()
        check_pi0_lora()
    finally:
        dist.destroy_process_group()
    print("no view-tensor warnings")
    print("FSDP2 OK")


if __name__ == "__main__":
    main()
