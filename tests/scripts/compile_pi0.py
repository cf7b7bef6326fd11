"""pi0 and pi0.5 (with openpi's LoRA applied) under torch.compile: ``compile_for_inference``
(vision, projector, PaliGemma stack and the action expert, fullgraph) equals eager with no
recompile on the next call; per-block compile for training (``compile_blocks``: the expert's
layers are units too) gives eager's loss and gradients.

Run by tests/test_pi0_training.py in a fresh process without VLAKIT_TYPECHECK (beartype
wrappers are not traceable). Exits non-zero on a graph break or a difference.
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _counting import CountingBackend  # noqa: E402
from test_pi0_parity import CHUNK, MAX_DIM, _inputs, _tiny  # noqa: E402

import vlakit  # noqa: E402
from vlakit.distributed import compile_blocks, pi0_lora  # noqa: E402
from vlakit.heads import Sampling  # noqa: E402

assert not vlakit.typecheck_enabled(), "run without VLAKIT_TYPECHECK"


def adapted(variant: str):
    model = _tiny(variant)
    pi0_lora(model)
    with torch.no_grad():  # adapters that matter (B starts at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


noise = torch.randn(3, CHUNK, MAX_DIM, generator=torch.Generator().manual_seed(4))
for variant in ("pi0", "pi05"):
    inputs = _inputs(variant == "pi0")
    eager = adapted(variant).eval()
    want = eager.predict_action(inputs, Sampling(noise=noise))
    backend = CountingBackend()
    compiled = copy.deepcopy(eager).compile_for_inference(backend=backend)
    torch._dynamo.reset()
    got = compiled.predict_action(inputs, Sampling(noise=noise))
    graphs = backend.graphs
    again = compiled.predict_action(inputs, Sampling(noise=noise))
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"{variant}: compiled differs from eager by {diff}"
    assert torch.equal(got, again), f"{variant}: a second compiled call differs"
    assert backend.graphs == graphs, f"{variant}: the second call recompiled"
    print(f"{variant}: compile_for_inference fullgraph OK, {graphs} graphs, "
          f"max |compiled - eager| = {diff:.1e}")

    draws = dict(noise=noise, time=torch.tensor([0.2, 0.5, 0.9]))
    train_inputs = _inputs(variant == "pi0", actions=True, pad=True)
    reference = adapted(variant).train()
    blocks = copy.deepcopy(reference)
    compile_blocks(blocks, backend=CountingBackend())
    torch._dynamo.reset()
    loss_ref = reference(train_inputs, sampling=Sampling(**draws)).loss
    loss_ref.backward()
    loss = blocks(train_inputs, sampling=Sampling(**draws)).loss
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for name, param in blocks.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert len(grads) > 20 and any("head.expert" in n and "lora" in n for n in grads)
    print(f"{variant}: compile_blocks with LoRA: loss and {len(grads)} gradients equal eager")
print("COMPILE PI0 OK")
