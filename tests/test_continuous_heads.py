"""Continuous heads (L1 regression, diffusion, flow matching) on any assembly: parameter
counts, own decoder vs HFDecoder, cached prefix vs full re-run, samples, bad input, and the
compiled fast path."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from _tiny import VOCAB_SIZE

from vlakit import VLA, VLAInputs
from vlakit.convert import decoder_from_transformers
from vlakit.core import BidirectionalMask, ParallelDecodingMask, TokenRole
from vlakit.decoders import HFDecoder
from vlakit.heads import (
    DiffusionActionHead,
    FlowMatchingHead,
    HeadTokens,
    L1RegressionHead,
    NoisyActionProjector,
    Sampling,
    read_slots,
)
from vlakit.interleave import PrefixInterleaver
from vlakit.models import oft_head, oft_mask
from vlakit.projectors import LinearProjector, ProprioProjector
from vlakit.vision import vit

D, CHUNK, ADIM = 64, 2, 3
SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _hf_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
    return transformers.LlamaForCausalLM(config).eval()


def _model(head, attention="bidirectional", decoder=None):
    torch.manual_seed(0)
    if decoder is None:
        decoder = decoder_from_transformers(_hf_llama())
    if isinstance(head, str):
        head = oft_head(head, D, CHUNK, ADIM, attention, num_inference_steps=3)
    return VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, D), PrefixInterleaver(1, 2), decoder, oft_mask(attention),
        head=head, proprio_projector=ProprioProjector(5, D), num_views=2,
    ).eval()


def _inputs(batch=3, actions=True):
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(batch, 6, dtype=torch.bool)
    valid[1:, 4:] = False  # right-padded rows of different prompt lengths
    return VLAInputs(
        input_ids=torch.randint(5, 200, (batch, 6), generator=g), text_valid=valid,
        pixels=torch.rand(batch, 2, 3, 28, 28, generator=g),
        actions=torch.rand(batch, CHUNK, ADIM, generator=g) * 2 - 1 if actions else None,
        proprio=torch.randn(batch, 5, generator=g),
    )


def _hf_twin(model):
    """The same model with its decoder run by transformers (HFDecoder)."""
    twin = copy.deepcopy(model)
    twin.decoder = HFDecoder(_hf_llama())
    return twin


# -- sizes -----------------------------------------------------------------------------------

def test_published_head_sizes():
    assert _count(L1RegressionHead(4096, action_dim=7, chunk_size=8)) == 151_117_831
    assert _count(NoisyActionProjector(4096)) == 16_789_504
    assert _count(ProprioProjector(8, 4096)) == 16_818_176


def test_openvla_oft_7b_libero_aloha_bridge_on_meta():
    from vlakit.models import openvla_oft_7b

    libero = openvla_oft_7b(device="meta")
    assert _count(libero) == 7_709_173_191 == 7_541_237_184 + 151_117_831 + 16_818_176
    aloha = openvla_oft_7b(num_views=3, proprio_dim=14, chunk_size=25, action_dim=14,
                           film=True, device="meta")
    assert aloha.head.num_action_tokens == 25 * 14 and aloha.encoder.has_film
    assert aloha.proprio_projector.in_dim == 14 and aloha.num_views == 3
    bridge = openvla_oft_7b(num_views=1, proprio_dim=None, chunk_size=5, device="meta")
    assert bridge.proprio_projector is None and bridge.head.chunk_size == 5
    diffusion = openvla_oft_7b(head="diffusion", device="meta")
    assert _count(diffusion) - _count(libero) == 16_789_504  # + the noisy-action projector
    assert diffusion.head.layout == "oft"
    assert openvla_oft_7b(head="flow", attention="parallel", device="meta").head.layout == "cached"


# -- one head on every decoder ---------------------------------------------------------------

@pytest.mark.parametrize("head, attention", [
    ("l1", "bidirectional"), ("diffusion", "bidirectional"), ("diffusion", "parallel"),
    ("flow", "parallel"), ("flow", "causal"), ("flow", "bidirectional"),
])
def test_head_gives_the_same_loss_and_actions_on_own_decoder_and_hfdecoder(head, attention):
    """Same weights: vlakit's decoder (cached prefix where the layout has one) and
    transformers through HFDecoder (full re-run per step) agree on loss and actions."""
    own = _model(head, attention)
    hf = _hf_twin(own)
    inputs = _inputs()
    torch.manual_seed(7)
    loss_own = own(inputs).loss
    torch.manual_seed(7)
    loss_hf = hf(inputs).loss
    torch.testing.assert_close(loss_own, loss_hf, atol=2e-5, rtol=1e-4)
    actions = own.predict_action(inputs, Sampling(generator=torch.Generator().manual_seed(8)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actions_hf = hf.predict_action(
            inputs, Sampling(generator=torch.Generator().manual_seed(8)))
    assert actions.shape == (3, CHUNK, ADIM) and actions.dtype == torch.float32
    torch.testing.assert_close(actions, actions_hf, atol=5e-5, rtol=1e-4)
    cached = getattr(own.head, "layout", None) == "cached"
    assert len([w for w in caught if "re-runs the whole sequence" in str(w.message)]) == cached


def seeded(model, seed):
    """The same prediction draws for every call with this seed."""
    return Sampling(generator=torch.Generator().manual_seed(seed))


def _zero_slots(model, runner):
    """What the L1 head runs at prediction: zero slots."""
    return HeadTokens(action_embeds=model.head.slot_embeds(runner.batch_size, runner.device,
                                                           runner.dtype))


def test_training_backpropagates_into_every_block():
    for head in ("l1", "diffusion", "flow"):
        model = _model(head, "parallel" if head == "flow" else "bidirectional").train()
        model(_inputs()).loss.backward()
        for name in ("encoder", "projector", "decoder", "proprio_projector", "head"):
            grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), (head, name)


def test_l1_slots_are_zero_and_read_from_the_state_before_each_slot():
    model = _model("l1")
    inputs = _inputs(actions=False)
    runner = model.runner(inputs)
    hidden, seq = runner.run(_zero_slots(model, runner))
    slots = seq.role_mask(TokenRole.ACTION)
    assert torch.equal(seq.embeds[slots], torch.zeros_like(seq.embeds[slots]))
    first = slots.int().argmax(1)
    picked = read_slots(hidden, seq, CHUNK * ADIM, "previous")
    rows = torch.arange(3)
    torch.testing.assert_close(picked[:, 0], hidden[rows, first - 1])  # the prompt's last token
    assert (seq.roles[rows, first - 1] == int(TokenRole.TEXT)).all()
    own = read_slots(hidden, seq, CHUNK * ADIM, "slot")
    torch.testing.assert_close(own[:, 0], hidden[rows, first])


def test_cached_prefix_equals_the_full_sequence_for_the_same_tokens():
    """A suffix run against the cached prefix gives the hidden states of one full pass."""
    model = _model("flow", "parallel")
    runner = model.runner(_inputs(actions=False))
    x = torch.randn(3, CHUNK, ADIM)
    tokens = HeadTokens(action_embeds=model.head.embed_actions(x, torch.full((3,), 0.4)))
    full_hidden, full_seq = runner.run(tokens)
    assert runner.suffix_length(CHUNK) == CHUNK + 1  # the slots, then </s>
    prefix = runner.prefix(suffix_len=runner.suffix_length(CHUNK))
    with torch.no_grad():
        part_hidden, part_seq = prefix.run(tokens)
    torch.testing.assert_close(
        model.head.velocity(part_hidden, part_seq), model.head.velocity(full_hidden, full_seq),
        atol=1e-5, rtol=1e-5)
    # the suffix positions continue each row's prefix
    want = full_seq.positions[full_seq.role_mask(TokenRole.ACTION)].view(3, CHUNK)
    assert torch.equal(part_seq.positions[part_seq.role_mask(TokenRole.ACTION)].view(3, CHUNK),
                       want)


def test_num_samples_share_one_prefix():
    model = _model("diffusion", "parallel")
    inputs = _inputs(actions=False)
    sampling = Sampling(num_samples=4, generator=torch.Generator().manual_seed(3))
    samples = model.predict_action(inputs, sampling)
    assert samples.shape == (3, 4, CHUNK, ADIM)
    assert not torch.allclose(samples[:, 0], samples[:, 1])
    # the full re-run path (HFDecoder) draws the same samples
    twin = _hf_twin(model)
    sampling = Sampling(num_samples=4, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(twin.predict_action(inputs, sampling), samples,
                                   atol=5e-5, rtol=1e-4)


def test_diffusion_step_is_the_schedulers_own_step():
    """One denoising step of the head equals the passed scheduler's ``step``: any diffusers
    scheduler, any step count."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=20, beta_schedule="linear")
    head = DiffusionActionHead(D, ADIM, CHUNK, scheduler=scheduler, num_inference_steps=1,
                               layout="cached")
    model = _model(head, "parallel")
    inputs = _inputs(actions=False)
    x = torch.randn(3, CHUNK, ADIM)
    got = model.predict_action(inputs, Sampling(noise=x))
    reference = copy.deepcopy(scheduler)
    reference.set_timesteps(1)
    (t,) = reference.timesteps.tolist()
    runner = model.runner(inputs)
    hidden, seq = runner.run(head.tokens(x, torch.full((3,), t), runner.dtype))
    want = reference.step(head.predict_noise(hidden, seq), t, x).prev_sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- bad input -------------------------------------------------------------------------------

def test_bad_input_names_both_numbers():
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="num_inference_steps=60 .* num_train_timesteps=50"):
        DiffusionActionHead(D, ADIM, CHUNK, num_inference_steps=60)
    with pytest.raises(ValueError, match="num_inference_steps=30 .* num_train_timesteps=20"):
        DiffusionActionHead(D, ADIM, CHUNK, scheduler=DDIMScheduler(num_train_timesteps=20),
                            num_inference_steps=30)
    model = _model("l1")
    with pytest.raises(ValueError, match="L1RegressionHead is deterministic .* num_samples"):
        model.predict_action(_inputs(actions=False), Sampling(num_samples=2))
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1 or None, got 0"):
        Sampling(num_samples=0)
    bad = _inputs()
    bad.proprio = torch.randn(3, 7)
    with pytest.raises(ValueError, match="7.*5|5.*7"):
        model(bad)
    one_view = _inputs()
    one_view.pixels = one_view.pixels[:, :1]
    with pytest.raises(ValueError, match="built for 2 camera view.* has 1"):
        model(one_view)
    with pytest.raises(ValueError, match=r"actions must be \[batch, chunk=2, action_dim=3\]"):
        model(VLAInputs(**{**_inputs().__dict__, "actions": torch.zeros(3, 4, 3)}))


def test_head_disagreeing_with_the_slots_names_both_counts():
    model = _model("l1")
    inputs = _inputs(actions=False)
    runner = model.runner(inputs)
    hidden, seq = runner.run(_zero_slots(model, runner))
    with pytest.raises(ValueError, match="has 6 action slots per row but .* reads 8"):
        read_slots(hidden, seq, 8, head="a head")
    wide = L1RegressionHead(D, ADIM, chunk_size=4)  # 12 slots expected, 6 placed
    with pytest.raises(ValueError, match="6 action slots per row but L1RegressionHead reads 12"):
        wide.actions_from(hidden, seq)


def test_cached_layout_refuses_a_mask_that_lets_the_prefix_see_the_suffix():
    head = FlowMatchingHead(D, ADIM, CHUNK, num_steps=2, layout="cached")
    model = _model(head, "bidirectional")
    with pytest.raises(ValueError, match="lets prefix tokens attend to the suffix"):
        model.predict_action(_inputs(actions=False))


def test_prefix_on_a_decoder_without_a_read_only_cache_says_so():
    model = _hf_twin(_model("flow", "parallel"))
    with pytest.raises(RuntimeError, match="cannot keep a prefix cache"):
        model.runner(_inputs(actions=False)).prefix()


def test_fallback_warning_is_given_once():
    model = _hf_twin(_model("flow", "parallel"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.predict_action(_inputs(actions=False))
        model.predict_action(_inputs(actions=False))
    assert len([w for w in caught if "re-runs the whole sequence" in str(w.message)]) == 1


def test_parallel_decoding_mask_keeps_the_prefix_blind():
    model = _model("l1", "parallel")
    runner = model.runner(_inputs(actions=False))
    _, seq = runner.run(_zero_slots(model, runner))
    mask = ParallelDecodingMask()(seq)
    suffix = seq.is_suffix
    for row in range(3):
        prefix_rows = ~suffix[row] & seq.valid[row]
        assert not mask[row][prefix_rows][:, suffix[row]].any()  # prefix never sees suffix
        assert mask[row][suffix[row]][:, seq.valid[row]].all()  # suffix sees every real token
    assert isinstance(oft_mask("bidirectional"), BidirectionalMask)


# -- compiled fast path ----------------------------------------------------------------------

def test_predict_action_compiles_fullgraph_with_every_head_and_matches_eager():
    env = {k: v for k, v in os.environ.items() if k != "VLAKIT_TYPECHECK"}
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, "compile_heads.py")],
                          capture_output=True, text=True, timeout=900, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for name in ("l1/bidirectional", "diffusion/bidirectional/oft", "diffusion/parallel/cached",
                 "flow/parallel/cached", "flow/causal/cached"):
        assert f"{name}" in out and "COMPILE HEADS OK" in out, out[-4000:]
