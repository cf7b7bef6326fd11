"""pi0 and pi0.5 against references written here from the published algorithm (openpi's
``PI0Pytorch`` / LeRobot 0.6.1's ``PI0Pytorch`` and ``PI05Pytorch``, read, not imported).

The reference is the joint pass: per layer, the PaliGemma stream and the expert stream are
normalised, projected to queries, keys and values, concatenated along the sequence,
rotated at ``positions = cumsum(valid) - 1`` and attended with ONE softmax under
``make_att_2d_masks`` (``cumsum(att)[k] <= cumsum(att)[q]`` and both valid, masked scores
``-2.3819763e38``), then split back, projected out, residual (gated in pi0.5's expert),
post-attention norm, GeGLU MLP, residual; the final norms last. The prefix is laid out as
the references lay it out (images, then the prompt padded to its length, then the suffix:
padding in the middle of the joint sequence), at batch 3 with prompts of three lengths.

vlakit runs the prefix once through its decoder into a KV cache and the expert against it
(``VLAPrefix.run_suffix``), with padding moved to the row ends. Everything the reference
reads of the PaliGemma's last layer beyond its keys and values (queries, output projection,
MLP, post-attention norm, final norm) is random junk made here: vlakit does not build it.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlakit import VLA, VLAInputs
from vlakit.core import TokenRole, TokenSequence
from vlakit.heads import Sampling
from vlakit.models import pi0, pi0_decoder, pi0_expert, pi0_mask, pi05
from vlakit.processors import pi05_prompt, pi05_state_bins
from vlakit.projectors import LinearProjector
from vlakit.vision import vit

VOCAB, IMAGE_ID, BOS = 64, 64, 2
VIEWS, PATCHES = 2, 4  # 28 px / 14 px patches: 4 tokens per view
CHUNK, ADIM, MAX_DIM, STATE_DIM = 4, 3, 6, 4
EXPERT_WIDTH, DEPTH, HEADS, HEAD_DIM = 16, 2, 2, 8
PROMPT_LENGTHS = (2, 5, 3)  # words after <bos>: three lengths, so two rows are padded
NEG = -2.3819763e38  # openpi's masked score


def _tiny(variant: str, kv_only: bool = True) -> VLA:
    torch.manual_seed(0)
    parts = dict(
        encoder=vit(img_size=28, patch_size=14, dim=24, depth=1, num_heads=2, mlp_dim=48),
        projector=LinearProjector(24, 32, bias=True),
        decoder=pi0_decoder(vocab_size=VOCAB, dim=32, num_layers=DEPTH, num_heads=HEADS,
                            num_kv_heads=1, head_dim=HEAD_DIM, mlp_dim=64,
                            last_layer_kv_only=kv_only),
        action_dim=ADIM, chunk_size=CHUNK, max_dim=MAX_DIM, image_token_id=IMAGE_ID,
    )
    cond = EXPERT_WIDTH if variant == "pi05" else None
    expert = pi0_expert(dim=EXPERT_WIDTH, num_layers=DEPTH, num_heads=HEADS, num_kv_heads=1,
                        head_dim=HEAD_DIM, mlp_dim=32, cond_dim=cond)
    model = (pi05 if variant == "pi05" else pi0)(expert=expert, **parts).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight random and non-zero (adaptive norms start at 0)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _inputs(with_state: bool, actions: bool = False, pad: bool = False) -> VLAInputs:
    g = torch.Generator().manual_seed(2)
    longest = 1 + max(PROMPT_LENGTHS)
    ids = torch.zeros(3, VIEWS * PATCHES + longest, dtype=torch.long)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for row, n in enumerate(PROMPT_LENGTHS):
        words = torch.randint(3, VOCAB, (n,), generator=g)
        tokens = torch.cat((torch.full((VIEWS * PATCHES,), IMAGE_ID), torch.tensor([BOS]),
                            words))
        ids[row, : len(tokens)], valid[row, : len(tokens)] = tokens, True
    is_pad = None
    if pad:
        is_pad = torch.zeros(3, CHUNK, dtype=torch.bool)
        is_pad[0, -1], is_pad[2, 2:] = True, True
    return VLAInputs(
        input_ids=ids, text_valid=valid,
        pixels=torch.randn(3, VIEWS, 3, 28, 28, generator=g),
        proprio=torch.randn(3, STATE_DIM, generator=g) if with_state else None,
        actions=torch.randn(3, CHUNK, ADIM, generator=g) if actions else None,
        action_is_pad=is_pad,
    )


# -- the reference: the published joint pass ----------------------------------------------

def _rms(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _norm(weights, x, cond):
    """Gemma's ``rms(x) (1 + w)``, or pi0.5's adaRMS: ``scale, shift, gate = dense(cond)``,
    ``rms(x) (1 + scale) + shift`` and the gate for the residual."""
    if "dense.weight" not in weights:
        return _rms(x) * (1 + weights["weight"]), None
    mod = cond @ weights["dense.weight"].T + weights["dense.bias"]  # [b, 3d]
    scale, shift, gate = mod[:, None].chunk(3, dim=-1)
    return _rms(x) * (1 + scale) + shift, gate


def _rope(x, positions, base=10000.0):
    hd = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2).float() / hd)
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), -1)[:, None]  # [b, 1, n, hd]
    x1, x2 = x.chunk(2, -1)
    return x * angles.cos() + torch.cat((-x2, x1), -1) * angles.sin()


def _weights(module, prefix):
    return {k[len(prefix):]: v for k, v in module.state_dict().items() if k.startswith(prefix)}


def _paligemma_stream(model: VLA, junk_seed: int):
    """Per-layer weights of the PaliGemma stream; what vlakit does not build (the last
    layer's queries, output projection, MLP, post-attention norm; the final norm) is random
    junk drawn from ``junk_seed``."""
    g = torch.Generator().manual_seed(junk_seed)
    layers = []
    decoder = model.decoder
    for i in range(DEPTH):
        w = _weights(decoder, f"layers.{i}.")
        if "attn.q_proj.weight" not in w:
            d = decoder.dim
            w["attn.q_proj.weight"] = torch.randn(HEADS * HEAD_DIM, d, generator=g)
            w["attn.o_proj.weight"] = torch.randn(d, HEADS * HEAD_DIM, generator=g)
            w["mlp_norm.weight"] = torch.randn(d, generator=g)
            for name, shape in (("gate_proj", (64, d)), ("up_proj", (64, d)),
                                ("down_proj", (d, 64))):
                w[f"mlp.{name}.weight"] = torch.randn(shape, generator=g)
        layers.append(w)
    final = _weights(decoder, "norm.") or {"weight": torch.randn(decoder.dim, generator=g)}
    return layers, final


def _expert_stream(model: VLA, junk_seed: int):
    """The expert's weights; pi0.5's final norm gets back the gate rows vlakit drops."""
    g = torch.Generator().manual_seed(junk_seed)
    expert = model.head.expert
    layers = [_weights(expert, f"layers.{i}.") for i in range(DEPTH)]
    final = _weights(expert, "norm.")
    if "dense.weight" in final and final["dense.weight"].shape[0] == 2 * EXPERT_WIDTH:
        final["dense.weight"] = torch.cat(
            (final["dense.weight"], torch.randn(EXPERT_WIDTH, EXPERT_WIDTH, generator=g)))
        final["dense.bias"] = torch.cat((final["dense.bias"],
                                         torch.randn(EXPERT_WIDTH, generator=g)))
    return layers, final


def _mlp(w, x):
    gate = F.gelu(x @ w["mlp.gate_proj.weight"].T, approximate="tanh")
    return (gate * (x @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T


def joint_pass(streams, embeds, pad, att, conds):
    """The joint forward of both stacks: ``embeds``/``pad``/``att`` per stream (prefix,
    suffix), one softmax per layer over the concatenation. Returns the final-normed outputs
    of both streams."""
    pad_all, att_all = torch.cat(pad, 1), torch.cat(att, 1)
    cumsum = torch.cumsum(att_all.long(), 1)
    allowed = (cumsum[:, None, :] <= cumsum[:, :, None]) & pad_all[:, None, :] & pad_all[:, :, None]
    bias = torch.where(allowed, 0.0, NEG)[:, None]  # [b, 1, n, n]
    positions = torch.cumsum(pad_all.long(), 1) - 1
    xs = list(embeds)
    lengths = [x.shape[1] for x in xs]
    for i in range(DEPTH):
        qs, ks, vs, gates = [], [], [], []
        for (layers, _), x, cond in zip(streams, xs, conds):
            w = layers[i]
            h, gate = _norm(_weights_of(w, "attn_norm."), x, cond)
            gates.append(gate)
            b, n = x.shape[:2]
            qs.append((h @ w["attn.q_proj.weight"].T).view(b, n, HEADS, HEAD_DIM).transpose(1, 2))
            ks.append((h @ w["attn.k_proj.weight"].T).view(b, n, 1, HEAD_DIM).transpose(1, 2))
            vs.append((h @ w["attn.v_proj.weight"].T).view(b, n, 1, HEAD_DIM).transpose(1, 2))
        q = _rope(torch.cat(qs, 2), positions)
        k = _rope(torch.cat(ks, 2), positions).expand(-1, HEADS, -1, -1)
        v = torch.cat(vs, 2).expand(-1, HEADS, -1, -1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + bias
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(q.shape[0], -1, HEADS * HEAD_DIM)
        outs = out.split(lengths, 1)
        new = []
        for (layers, _), x, o, gate, cond in zip(streams, xs, outs, gates, conds):
            w = layers[i]
            y = o @ w["attn.o_proj.weight"].T
            x = x + (y if gate is None else gate * y)
            h, gate = _norm(_weights_of(w, "mlp_norm."), x, cond)
            y = _mlp(w, h)
            new.append(x + (y if gate is None else gate * y))
        xs = new
    return [_norm(final, x, cond)[0] for (_, final), x, cond in zip(streams, xs, conds)]


def _weights_of(w, prefix):
    return {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}


def _time_embedding(t, dim, min_period=4e-3, max_period=4.0):
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    angles = (1.0 / period * 2 * math.pi)[None] * t[:, None]
    return torch.cat((angles.sin(), angles.cos()), 1).to(torch.float32)


def _linear(module, x):
    return x @ module.weight.T + module.bias


def reference_suffix(model: VLA, x_t, t, state):
    """The expert stream's input as embed_suffix builds it: ``(embeds, att flags, cond)``."""
    head = model.head
    action = _linear(head.action_in_proj, x_t)
    temb = _time_embedding(t, EXPERT_WIDTH)
    if hasattr(head, "state_proj"):  # pi0
        mixed = torch.cat((action, temb[:, None].expand_as(action)), -1)
        tokens = _linear(head.action_time_mlp_out, F.silu(_linear(head.action_time_mlp_in, mixed)))
        state_token = _linear(head.state_proj, F.pad(state, (0, MAX_DIM - state.shape[1])))
        embeds = torch.cat((state_token[:, None], tokens), 1)
        att = torch.tensor([1, 1] + [0] * (CHUNK - 1)).expand(len(t), -1)
        return embeds, att, None
    cond = F.silu(_linear(head.time_mlp_out, F.silu(_linear(head.time_mlp_in, temb))))
    return action, torch.tensor([1] + [0] * (CHUNK - 1)).expand(len(t), -1), cond


def reference_prefix(model: VLA, inputs: VLAInputs):
    """Images then the padded prompt, as embed_prefix lays them out: ``(embeds, valid)``."""
    images = model.projector(model.encoder(inputs.pixels))  # [b, v p, d], unscaled
    lang = model.decoder.embed_tokens(inputs.input_ids[:, VIEWS * PATCHES:])  # sqrt(d) scaled
    valid = torch.cat((torch.ones(3, VIEWS * PATCHES, dtype=torch.bool),
                       inputs.text_valid[:, VIEWS * PATCHES:]), 1)
    return torch.cat((images, lang), 1), valid


def reference_velocity(model, inputs, x_t, t, junk_seed=5):
    prefix, valid = reference_prefix(model, inputs)
    suffix, att, cond = reference_suffix(model, x_t, t, inputs.proprio)
    streams = [_paligemma_stream(model, junk_seed), _expert_stream(model, junk_seed)]
    _, out = joint_pass(streams, [prefix, suffix], [valid, torch.ones(att.shape, dtype=bool)],
                        [torch.zeros_like(valid, dtype=torch.long), att], [None, cond])
    return _linear(model.head.action_out_proj, out[:, -CHUNK:])


# -- the tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_prefix_then_expert_equals_the_joint_pass(variant):
    """Item 1: the expert's suffix run against the cached prefix equals the joint pass
    (per-layer concatenated Q/K/V, one softmax), batch 3, padded prompts, positions from the
    valid tokens only; the never-built parts of the last PaliGemma layer change nothing."""
    model = _tiny(variant)
    inputs = _inputs(with_state=variant == "pi0")
    g = torch.Generator().manual_seed(4)
    x_t, t = torch.randn(3, CHUNK, MAX_DIM, generator=g), torch.tensor([0.9, 0.35, 0.05])
    with torch.no_grad():
        suffix, att, cond = reference_suffix(model, x_t, t, inputs.proprio)
        prefix, valid = reference_prefix(model, inputs)
        ones = torch.ones(att.shape, dtype=torch.bool)
        refs = []
        for junk in (5, 6):  # two different guesses for what vlakit does not build
            streams = [_paligemma_stream(model, junk), _expert_stream(model, junk)]
            refs.append(joint_pass(streams, [prefix, suffix], [valid, ones],
                                   [torch.zeros_like(valid, dtype=torch.long), att],
                                   [None, cond])[1])
        torch.testing.assert_close(refs[0], refs[1], rtol=0, atol=0)
        runner = model.runner(inputs)
        cached = runner.prefix()
        roles = torch.full(att.shape, int(TokenRole.ACTION))
        if variant == "pi0":
            roles[:, 0] = int(TokenRole.PROPRIO)
        got = cached.run_suffix(suffix, roles, decoder=model.head.expert, condition=cond)
        torch.testing.assert_close(got, refs[0], rtol=1e-5, atol=1e-5)
        # the head's own suffix tokens and velocity are the reference's too
        state = None if variant == "pi05" else F.pad(inputs.proprio, (0, MAX_DIM - STATE_DIM))
        embeds, _, head_cond = model.head.expert_tokens(x_t, t, state)
        torch.testing.assert_close(embeds, suffix, rtol=1e-6, atol=1e-6)
        if cond is not None:
            torch.testing.assert_close(head_cond, cond, rtol=1e-6, atol=1e-6)
        velocity = model.head.velocity(runner.prefix(), x_t, t, state)
        torch.testing.assert_close(velocity, reference_velocity(model, inputs, x_t, t),
                                   rtol=1e-5, atol=1e-5)


def test_prefix_positions_count_valid_tokens_and_the_mask_is_pi0s():
    """The prefix vlakit encodes: positions 0.. over valid tokens (openpi's cumsum - 1), the
    suffix continuing from each row's count; pi0_mask's pattern is make_att_2d_masks'."""
    model = _tiny("pi0")
    inputs = _inputs(with_state=True)
    seq = model.runner(inputs).sequence()
    for row, n in enumerate(PROMPT_LENGTHS):
        count = VIEWS * PATCHES + 1 + n
        assert seq.positions[row, :count].tolist() == list(range(count))
        assert not seq.valid[row, count:].any()
    prefix = model.runner(inputs).prefix()
    assert prefix._next_position.tolist() == [VIEWS * PATCHES + 1 + n for n in PROMPT_LENGTHS]
    # pi0_mask over [image, bos, text, pad, state, action, action] against the reference rule
    roles = torch.tensor([[TokenRole.IMAGE, TokenRole.BOS, TokenRole.TEXT, TokenRole.PAD,
                           TokenRole.PROPRIO, TokenRole.ACTION, TokenRole.ACTION]])
    valid = roles != TokenRole.PAD
    seq = TokenSequence(embeds=torch.zeros(1, 7, 4), roles=roles,
                        positions=torch.arange(7)[None], valid=valid,
                        is_suffix=torch.zeros_like(valid), token_ids=torch.zeros_like(roles))
    att = torch.tensor([[0, 0, 0, 0, 1, 1, 0]]).cumsum(1)
    expected = (att[:, None, :] <= att[:, :, None]) & valid[:, None, :]
    got = pi0_mask()(seq)
    real = valid[0]
    assert torch.equal(got[0][real][:, real], expected[0][real][:, real])


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("pad", [False, True])
def test_flow_loss_with_given_noise_and_time(variant, pad):
    """Item 2/7: the loss with given noise (all max_dim dims) and time: ``x_t = t eps +
    (1 - t) a``, target ``eps - a``, squared error on the real dims only; the plain mean
    (LeRobot's) without padded steps, the mean over real steps with ``action_is_pad``."""
    model = _tiny(variant)
    inputs = _inputs(with_state=variant == "pi0", actions=True, pad=pad)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(3, CHUNK, MAX_DIM, generator=g)
    t = torch.tensor([0.7, 0.2, 0.999])
    loss = model(inputs, sampling=Sampling(noise=noise, time=t)).loss
    with torch.no_grad():
        a = F.pad(inputs.actions, (0, MAX_DIM - ADIM))
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * a
        v = reference_velocity(model, inputs, x_t, t)
        errors = (v - (noise - a))[..., :ADIM].square()  # LeRobot: mse, cut to the real dims
        if pad:
            real = (~inputs.action_is_pad)[..., None].float()
            expected = (errors * real).sum() / (real.sum() * ADIM)
        else:
            expected = errors.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    out = model.head.action_out_proj
    assert out.weight.grad[:ADIM].abs().sum() > 0
    assert out.weight.grad[ADIM:].abs().sum() == 0  # rows past the real dims: no gradient
    last_kv = model.decoder.layers[-1].attn.k_proj.weight.grad  # through the cached keys
    assert last_kv is not None and last_kv.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_ten_euler_steps_with_given_noise(variant):
    """Item 2/7: prediction is 10 Euler steps from the given noise at t = 1 (dt = -0.1) over
    all max_dim dims (the padded dims' untrained velocities feed action_in_proj at the next
    step), cut to the real dims at the end; the reference re-runs the joint pass per step."""
    model = _tiny(variant)
    inputs = _inputs(with_state=variant == "pi0")
    noise = torch.randn(3, CHUNK, MAX_DIM, generator=torch.Generator().manual_seed(8))
    got = model.predict_action(inputs, Sampling(noise=noise), unnormalize=False)
    with torch.no_grad():
        x, dt = noise, -1.0 / 10
        for k in range(10):
            t = torch.full((3,), 1.0 + k * dt)
            x = x + dt * reference_velocity(model, inputs, x, t)
        # the padded dims matter: integrating only the real ones gives other actions
        y = noise.clone()
        for k in range(10):
            t = torch.full((3,), 1.0 + k * dt)
            y = y + dt * reference_velocity(model, inputs, y, t)
            y[..., ADIM:] = noise[..., ADIM:]
    assert got.shape == (3, CHUNK, ADIM)
    torch.testing.assert_close(got, x[..., :ADIM], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, y[..., :ADIM], atol=1e-3)


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_the_kv_only_last_layer_predicts_what_the_whole_layer_does(variant):
    """openpi's layout (the last PaliGemma layer whole, the final norm) with the same weights
    gives the same actions: what vlakit leaves out is never read."""
    lean = _tiny(variant)
    whole = _tiny(variant, kv_only=False)
    missing = whole.load_state_dict(lean.state_dict(), strict=False)
    assert not missing.unexpected_keys
    assert sorted(missing.missing_keys) == sorted(
        [f"decoder.layers.{DEPTH - 1}.attn.{p}_proj.weight" for p in "qo"]
        + [f"decoder.layers.{DEPTH - 1}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        + [f"decoder.layers.{DEPTH - 1}.mlp_norm.weight", "decoder.norm.weight"])
    inputs = _inputs(with_state=variant == "pi0")
    noise = torch.randn(3, CHUNK, MAX_DIM, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(
        whole.predict_action(inputs, Sampling(noise=noise)),
        lean.predict_action(inputs, Sampling(noise=noise)), rtol=1e-5, atol=1e-6)


def test_pi05_adaptive_norm_is_the_published_adarms():
    """pi0.5's expert norms: ``scale, shift, gate = dense(cond)``, ``rms(x) (1 + scale) +
    shift``, residual ``x + gate y``; the final norm without its gate rows gives the same."""
    model = _tiny("pi05")
    expert = model.head.expert
    x, cond = torch.randn(3, 5, EXPERT_WIDTH), torch.randn(3, EXPERT_WIDTH)
    layer = expert.layers[0]
    y, gate = layer.attn_norm(x, cond)
    ref, ref_gate = _norm(_weights(layer.attn_norm, ""), x, cond)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate, ref_gate, rtol=1e-5, atol=1e-6)
    full = _expert_stream(model, 3)[1]
    y, none = expert.norm(x, cond)
    assert none is None and expert.norm.dense.weight.shape == (2 * EXPERT_WIDTH, EXPERT_WIDTH)
    torch.testing.assert_close(y, _norm(full, x, cond)[0], rtol=1e-5, atol=1e-6)


def test_pi05_state_bins_are_openpis_digitize():
    """``digitize(s, linspace(-1, 1, 257)[:-1]) - 1``: left-closed bins, nothing clipped."""
    edges = np.linspace(-1, 1, 257)[:-1]
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.uniform(-1.3, 1.3, 500), edges, np.nextafter(edges, -np.inf), [-1.0, -1.5, 1.0,
        2.0, 0.0, -0.0, 1e-30, -1e-30, 0.9921875, np.nextafter(0.9921875, -1)],
    ]).astype(np.float32)
    expected = np.digitize(values.astype(np.float64), edges) - 1
    got = pi05_state_bins(torch.from_numpy(values))
    assert got.tolist() == expected.tolist()
    assert pi05_state_bins(values).tolist() == expected.tolist()  # numpy in
    assert got[values < -1].eq(-1).all() and got[values >= 1].eq(255).all()
    state = torch.tensor([-1.0, -0.5, 0.0, 0.999, -2.0])
    prompt = pi05_prompt("  pick_up the\ncup ", state)
    assert prompt == "Task: pick up the cup, State: 0 64 128 255 -1;\nAction: "
    with pytest.raises(ValueError, match="NaN"):
        pi05_state_bins(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="one example's state"):
        pi05_prompt("task", np.zeros((2, 3)))
