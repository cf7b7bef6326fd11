"""``VLA.compile_for_inference()`` with every continuous head: fullgraph, compiled == eager.

Run by tests/test_continuous_heads.py in a fresh process without VLAKIT_TYPECHECK (beartype
wrappers are not traceable). Exits non-zero on a graph break, on a recompile when the same
batch is predicted again, or on actions that differ from eager.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _counting import CountingBackend  # noqa: E402
from _tiny import VOCAB_SIZE  # noqa: E402

import vlakit  # noqa: E402
from vlakit import VLA, VLAInputs  # noqa: E402
from vlakit.decoders import llama  # noqa: E402
from vlakit.heads import Sampling  # noqa: E402
from vlakit.interleave import PrefixInterleaver  # noqa: E402
from vlakit.models import oft_head, oft_mask  # noqa: E402
from vlakit.projectors import LinearProjector, ProprioProjector  # noqa: E402
from vlakit.vision import vit  # noqa: E402

assert not vlakit.typecheck_enabled(), "run without VLAKIT_TYPECHECK"


def model(head: str, attention: str) -> VLA:
    torch.manual_seed(0)
    return VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, 64), PrefixInterleaver(1, 2),
        llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
              mlp_dim=128),
        oft_mask(attention),
        head=oft_head(head, 64, chunk_size=2, action_dim=3, attention=attention,
                      num_inference_steps=4),
        proprio_projector=ProprioProjector(5, 64),
    ).eval()


torch.manual_seed(1)
inputs = VLAInputs(
    input_ids=torch.randint(5, 200, (2, 6)),
    text_valid=torch.tensor([[True] * 6, [True] * 4 + [False] * 2]),
    pixels=torch.rand(2, 2, 3, 28, 28), proprio=torch.randn(2, 5),
)
for head, attention in [("l1", "bidirectional"), ("diffusion", "bidirectional"),
                        ("diffusion", "parallel"), ("flow", "parallel"), ("flow", "causal")]:
    eager = model(head, attention)

    def sampling(head=head):  # the same draws for every call (deterministic heads: none)
        return None if head == "l1" else Sampling(generator=torch.Generator().manual_seed(3))

    want = eager.predict_action(inputs, sampling())
    backend = CountingBackend()
    compiled = eager.compile_for_inference(backend=backend)
    torch._dynamo.reset()
    got = compiled.predict_action(inputs, sampling())
    graphs = backend.graphs
    again = compiled.predict_action(inputs, sampling())
    diff = (got - want).abs().max().item()
    name = f"{head}/{attention}/{getattr(eager.head, 'layout', '-')}"
    assert diff < 1e-5, f"{name}: compiled differs from eager by {diff}"
    assert torch.equal(got, again), f"{name}: a second compiled call differs"
    assert backend.graphs == graphs, f"{name}: the second call recompiled"
    print(f"{name}: fullgraph OK, {graphs} graphs, max |compiled - eager| = {diff:.1e}")
print("COMPILE HEADS OK")
