"""Real-time chunking wrappers around a compiled model (``VLA.compile_for_inference``).

Run by tests/test_rtc.py in a fresh process without VLAKIT_TYPECHECK (beartype wrappers are
not traceable). Inpainting (elementwise arithmetic between the model's calls) must add no
graph to those of plain sampling, match eager, and not recompile on a second call. Guided
RTC needs autograd through the decoder: it is run and compared with eager, and the graphs it
adds (grad mode is part of a compiled graph's guards) are reported.
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
from vlakit.heads.rtc import GuidedRTC, InpaintRTC  # noqa: E402
from vlakit.interleave import PrefixInterleaver  # noqa: E402
from vlakit.models import oft_head, oft_mask  # noqa: E402
from vlakit.projectors import LinearProjector, ProprioProjector  # noqa: E402
from vlakit.vision import vit  # noqa: E402

assert not vlakit.typecheck_enabled(), "run without VLAKIT_TYPECHECK"

CHUNK, ADIM = 6, 3


def model(head: str, attention: str) -> VLA:
    torch.manual_seed(0)
    return VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, 64), PrefixInterleaver(1, 2),
        llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
              mlp_dim=128),
        oft_mask(attention),
        head=oft_head(head, 64, chunk_size=CHUNK, action_dim=ADIM, attention=attention,
                      num_inference_steps=4),
        proprio_projector=ProprioProjector(5, 64),
    ).eval()


torch.manual_seed(1)
inputs = VLAInputs(
    input_ids=torch.randint(5, 200, (2, 6)),
    text_valid=torch.tensor([[True] * 6, [True] * 4 + [False] * 2]),
    pixels=torch.rand(2, 2, 3, 28, 28), proprio=torch.randn(2, 5),
)
prev = torch.linspace(-1, 1, 2 * 4 * ADIM).reshape(2, 4, ADIM)  # a leftover of k = 4 = H - s


def sampling(wrapper=None):  # the same draws for every call
    return Sampling(generator=torch.Generator().manual_seed(3), step_wrapper=wrapper)


for head, attention in [("flow", "parallel"), ("diffusion", "parallel"),
                        ("diffusion", "bidirectional")]:
    eager = model(head, attention)
    name = f"{head}/{attention}/{eager.head.layout}"
    want = eager.predict_action(inputs, sampling(InpaintRTC(prev, frozen=2)))
    guided = head == "flow"
    if guided:
        want_guided = eager.predict_action(inputs, sampling(GuidedRTC(prev, 2, 2)))
    backend = CountingBackend()
    compiled = eager.compile_for_inference(backend=backend)
    torch._dynamo.reset()
    plain = compiled.predict_action(inputs, sampling())
    graphs = backend.graphs
    got = compiled.predict_action(inputs, sampling(InpaintRTC(prev, frozen=2)))
    assert backend.graphs == graphs, f"{name}: inpainting compiled {backend.graphs - graphs} more"
    again = compiled.predict_action(inputs, sampling(InpaintRTC(prev, frozen=2)))
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"{name}: compiled inpainting differs from eager by {diff}"
    assert torch.equal(got, again), f"{name}: a second compiled call differs"
    assert torch.equal(got[:, :2], prev[:, :2]), f"{name}: the frozen steps moved"
    assert backend.graphs == graphs, f"{name}: the second call recompiled"
    print(f"{name}: inpainting fullgraph OK, the {graphs} graphs of plain sampling, "
          f"max |compiled - eager| = {diff:.1e}")
    if guided:
        got_guided = compiled.predict_action(inputs, sampling(GuidedRTC(prev, 2, 2)))
        extra = backend.graphs - graphs
        diff = (got_guided - want_guided).abs().max().item()
        assert diff < 1e-4, f"{name}: compiled guided RTC differs from eager by {diff}"
        compiled.predict_action(inputs, sampling(GuidedRTC(prev, 2, 2)))
        assert backend.graphs == graphs + extra, f"{name}: guided recompiled on a second call"
        print(f"{name}: guided fullgraph OK, {extra} more graphs (autograd), "
              f"max |compiled - eager| = {diff:.1e}")
print("COMPILE RTC OK")
