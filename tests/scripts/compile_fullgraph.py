"""torch.compile(fullgraph=True) over vlakit's hot paths, with runtime type checking off.

Run by tests/test_compile.py in a fresh process without VLAKIT_TYPECHECK (beartype wrappers
are not traceable; the package is compile-clean without them). Exits non-zero on a graph
break, a recompile, or numbers that differ from eager.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _tiny import ACTION_VOCAB_END, VOCAB_SIZE  # noqa: E402

import vlakit  # noqa: E402
from vlakit import VLA, VLAInputs  # noqa: E402
from vlakit.actions import ActionNormalizer, ActionTokenizer  # noqa: E402
from vlakit.core import CausalMask, causal_mask, positions_from_valid  # noqa: E402
from vlakit.decoders import greedy_generate, llama  # noqa: E402
from vlakit.heads import DiscreteActionHead  # noqa: E402
from vlakit.interleave import PrefixInterleaver  # noqa: E402
from vlakit.projectors import MLPProjector  # noqa: E402
from vlakit.vision import vit  # noqa: E402

assert not vlakit.typecheck_enabled(), "run without VLAKIT_TYPECHECK"
BACKEND = "aot_eager"  # traces forward and backward graphs; no C++ build on this machine


class CountingBackend:
    """A backend that counts the graphs it is handed (one per compile or recompile)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def close(a, b, what, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def decoder_and_layer() -> None:
    torch.manual_seed(0)
    dec = llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                mlp_dim=128)
    valid = torch.tensor([[1] * 9, [1] * 6 + [0] * 3], dtype=torch.bool)
    embeds = torch.randn(2, 9, 64)
    mask, pos = causal_mask(valid), positions_from_valid(valid)
    cos, sin = dec.rope(pos, embeds.dtype)
    layer = dec.layers[0]
    close(torch.compile(layer, backend=BACKEND, fullgraph=True)(embeds, cos, sin, mask),
          layer(embeds, cos, sin, mask), "DecoderLayer")
    close(torch.compile(dec, backend=BACKEND, fullgraph=True)(embeds, mask, pos),
          dec(embeds, mask, pos), "TransformerDecoder")
    print("DecoderLayer, TransformerDecoder: fullgraph OK")

    # greedy generation: the one-token step compiles once for a fixed prompt length
    counter = CountingBackend()
    step = torch.compile(dec, backend=counter, fullgraph=True, dynamic=False)
    compiled = greedy_generate(dec, embeds, mask, pos, valid, 7, step=step)
    eager = greedy_generate(dec, embeds, mask, pos, valid, 7)
    assert torch.equal(compiled, eager), (compiled, eager)
    assert counter.graphs == 1, f"the step compiled {counter.graphs} times for 6 steps"
    greedy_generate(dec, embeds, mask, pos, valid, 7, step=step)  # same prompt length again
    assert counter.graphs == 1, f"a second generation recompiled ({counter.graphs} graphs)"
    print("greedy generation with a preallocated cache: compiled once")


def vit_block() -> None:
    torch.manual_seed(0)
    enc = vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64)
    x = torch.randn(2, 4, 32)
    block = enc.blocks[0]
    close(torch.compile(block, backend=BACKEND, fullgraph=True)(x), block(x), "ViTBlock")
    print("ViTBlock: fullgraph OK")


def whole_vla() -> None:
    torch.manual_seed(0)
    model = VLA(
        encoder=vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64),
        projector=MLPProjector([32, 64, 64]),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, mlp_dim=128),
        mask_policy=CausalMask(),
        head=DiscreteActionHead(ActionTokenizer(vocab_end=ACTION_VOCAB_END, action_dim=3),
                                chunk_size=2),
        action_normalizer=ActionNormalizer({"q01": [-1.0] * 3, "q99": [1.0] * 3}),
    )
    g = torch.Generator().manual_seed(1)
    inputs = VLAInputs(
        input_ids=torch.randint(3, 100, (2, 5), generator=g),
        text_valid=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool),
        pixels=torch.randn(2, 1, 3, 28, 28, generator=g),
        actions=torch.rand(2, 2, 3, generator=g) * 2 - 1,
    )
    eager = model(inputs)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = torch.compile(model, backend=BACKEND, fullgraph=True)(inputs)
    out.loss.backward()
    close(out.loss, eager.loss, "VLA loss")
    close(out.hidden, eager.hidden, "VLA hidden")
    for name, param in model.named_parameters():
        if name in grads:
            close(param.grad, grads[name], f"grad {name}")
    print(f"VLA.forward: fullgraph OK, loss {out.loss.item():.5f}, {len(grads)} gradients")


def vlm_and_blocks() -> None:
    """PaliGemma's layout (placeholders, prefix-LM, NextTokenHead) and pi0-style role
    blocks with a proprio token, compiled whole."""
    from vlakit.core import PrefixLMMask, RoleBlockMask, TokenRole
    from vlakit.interleave import PlaceholderInterleaver
    from vlakit.projectors import LinearProjector, ProprioProjector

    torch.manual_seed(0)
    encoder = vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64)
    vlm = VLA(encoder, LinearProjector(32, 64),
              PlaceholderInterleaver(310, bos_id=1, eos_id=2, position_offset=1),
              llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
              PrefixLMMask())
    ids = torch.tensor([[310] * 4 + [1, 5, 6, 7, 8, 2], [310] * 4 + [1, 9, 10, 2, 0, 0]])
    inputs = VLAInputs(
        input_ids=ids, text_valid=ids != 0,
        token_type_ids=torch.tensor([[0] * 7 + [1] * 3, [0] * 6 + [1] * 2 + [0] * 2]),
        pixels=torch.randn(2, 1, 3, 28, 28),
    )
    close(torch.compile(vlm, backend=BACKEND, fullgraph=True)(inputs).loss, vlm(inputs).loss,
          "VLM loss")
    blocks = RoleBlockMask([{TokenRole.BOS, TokenRole.IMAGE, TokenRole.TEXT},
                            {TokenRole.PROPRIO}, {TokenRole.ACTION, TokenRole.EOS}])
    pi0ish = VLA(encoder, LinearProjector(32, 64), PrefixInterleaver(bos_id=1, eos_id=2),
                 llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
                 blocks, head=DiscreteActionHead(
                     ActionTokenizer(vocab_end=ACTION_VOCAB_END, action_dim=3)),
                 proprio_projector=ProprioProjector(4, 64))
    prompt = torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 0, 0]])  # no <s>/</s>: added by it
    inputs = VLAInputs(input_ids=prompt, text_valid=prompt != 0,
                       pixels=torch.randn(2, 1, 3, 28, 28), proprio=torch.randn(2, 4),
                       actions=torch.rand(2, 1, 3) * 2 - 1)
    close(torch.compile(pi0ish, backend=BACKEND, fullgraph=True)(inputs).loss,
          pi0ish(inputs).loss, "role-block VLA loss")
    print("VLM (prefix-LM) and role-block VLA: fullgraph OK")


def pruned_vla() -> None:
    """Pruners with static shapes inside a whole compiled VLA.forward + backward: LightVLA's
    training mix, TopK before layer 0, FastV between layers (an AttentionTap inside the
    graph)."""
    from vlakit.core import BidirectionalMask
    from vlakit.heads import L1RegressionHead
    from vlakit.projectors import LinearProjector
    from vlakit.pruners import FastVPruner, LightVLAPruner, TopKPruner

    g = torch.Generator().manual_seed(1)
    inputs = VLAInputs(
        input_ids=torch.randint(3, 100, (2, 5), generator=g),
        text_valid=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool),
        pixels=torch.randn(2, 2, 3, 28, 28, generator=g),
        actions=torch.rand(2, 2, 3, generator=g) * 2 - 1,
    )
    for pruner, policy in [(LightVLAPruner(noise_scale=0.5), BidirectionalMask()),
                           (TopKPruner(0.5), CausalMask()),
                           (FastVPruner(layer=1, keep_ratio=0.5), CausalMask())]:
        torch.manual_seed(0)
        model = VLA(
            encoder=vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
            projector=LinearProjector(32, 64),
            interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
            decoder=llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4,
                          mlp_dim=128),
            mask_policy=policy, head=L1RegressionHead(64, action_dim=3, chunk_size=2),
            pruner=pruner,
        ).train()
        torch.manual_seed(3)
        eager = model(inputs)
        eager.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        torch.manual_seed(3)
        out = torch.compile(model, backend=BACKEND, fullgraph=True)(inputs)
        out.loss.backward()
        name = type(pruner).__name__
        close(out.loss, eager.loss, f"{name} loss")
        assert out.sequence.length == eager.sequence.length
        for pname, param in model.named_parameters():
            if pname in grads:
                close(param.grad, grads[pname], f"{name} grad {pname}")
    print("pruned VLA.forward (LightVLA training, TopK, FastV with a tap): fullgraph OK")

    # LightVLA at evaluation: a data-dependent kept count, bucketed by length_multiple, so
    # a decoder compiled with dynamic=False (compile_for_inference) compiles once
    torch.manual_seed(0)
    model = VLA(
        encoder=vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        projector=LinearProjector(32, 64), interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
        mask_policy=BidirectionalMask(), head=L1RegressionHead(64, action_dim=3, chunk_size=2),
        pruner=LightVLAPruner(length_multiple=32),
    ).eval()
    predict = VLAInputs(input_ids=inputs.input_ids, text_valid=inputs.text_valid,
                        pixels=inputs.pixels)
    other = VLAInputs(input_ids=inputs.input_ids, text_valid=inputs.text_valid,
                      pixels=torch.randn(2, 2, 3, 28, 28, generator=g))
    eager, counts = [], []
    for batch in (predict, other):
        eager.append(model.predict_action(batch))
        counts.append(model.pruner.last_kept.sum(1).tolist())
    assert counts[0] != counts[1], f"the two batches keep the same counts {counts}"
    counter = CountingBackend()
    model.decoder.compile(backend=counter, fullgraph=True, dynamic=False)
    compiled = [model.predict_action(predict), model.predict_action(other)]
    for a, b in zip(compiled, eager):
        close(a, b, "LightVLA eval, compiled decoder")
    assert counter.graphs == 1, f"the decoder compiled {counter.graphs} times"
    print(f"LightVLA evaluation, kept {counts}, length_multiple: the decoder compiled once")


def per_block_compile() -> None:
    """compile_blocks (the training recipe's per-block torch.compile): loss and gradients of
    a training step equal eager."""
    import copy

    from vlakit.core import BidirectionalMask
    from vlakit.distributed import checkpoint_blocks, compile_blocks
    from vlakit.heads import L1RegressionHead
    from vlakit.projectors import LinearProjector

    torch.manual_seed(0)
    model = VLA(
        encoder=vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64),
        projector=LinearProjector(32, 64), interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
        mask_policy=BidirectionalMask(), head=L1RegressionHead(64, action_dim=3, chunk_size=2),
    ).train()
    compiled = copy.deepcopy(model)
    counter = CountingBackend()
    checkpoint_blocks(compiled)  # the recipe's order: checkpointing, then per-block compile
    assert len(compile_blocks(compiled, backend=counter)) == 4
    g = torch.Generator().manual_seed(1)
    inputs = VLAInputs(input_ids=torch.randint(3, 100, (2, 5), generator=g),
                       text_valid=torch.ones(2, 5, dtype=torch.bool),
                       pixels=torch.randn(2, 1, 3, 28, 28, generator=g),
                       actions=torch.rand(2, 2, 3, generator=g) * 2 - 1)
    for m in (model, compiled):
        m(inputs).loss.backward()
    close(compiled(inputs).loss, model(inputs).loss, "per-block compiled loss")
    for (name, a), b in zip(model.named_parameters(), compiled.parameters()):
        close(b.grad, a.grad, f"per-block compiled grad {name}")
    assert counter.graphs >= 2, counter.graphs  # a vision block and a decoder layer
    print(f"compile_blocks: loss and gradients equal eager ({counter.graphs} graphs, with "
          f"activation checkpointing)")

    # LoRA layers (OFT's recipe) compile inside the blocks too
    from vlakit.distributed import oft_lora

    lora_model = copy.deepcopy(model)
    oft_lora(lora_model, rank=4)
    lora_compiled = copy.deepcopy(lora_model)
    compile_blocks(lora_compiled, backend=CountingBackend())
    for m in (lora_model, lora_compiled):
        m.zero_grad()
        m(inputs).loss.backward()
    close(lora_compiled(inputs).loss, lora_model(inputs).loss, "LoRA compiled loss")
    for (name, a), b in zip(lora_model.named_parameters(), lora_compiled.parameters()):
        if a.grad is not None:
            close(b.grad, a.grad, f"LoRA compiled grad {name}")
    print("oft_lora + compile_blocks: loss and gradients equal eager")


if __name__ == "__main__":
    per_block_compile()
    decoder_and_layer()
    vit_block()
    whole_vla()
    vlm_and_blocks()
    pruned_vla()
    print("COMPILE OK")
