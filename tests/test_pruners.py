"""Token pruners: LightVLA against a reference written here from the published algorithm,
batched inference equal to each sample alone, the attention tap against transformers'
eager attention, FastV between layers, the pruned prefix in the cache, own decoder vs
HFDecoder, the builders, and bad input."""

import copy
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_continuous_heads import (  # noqa: E402
    _hf_llama,
    _hf_twin,
    _inputs,
    _model,
    _zero_slots,
    seeded,
)

from vlakit import VLA  # noqa: E402
from vlakit.convert import decoder_from_transformers  # noqa: E402
from vlakit.core import (  # noqa: E402
    AttentionTap,
    BidirectionalMask,
    CausalMask,
    TokenRole,
    TokenSequence,
)
from vlakit.decoders import HFDecoder  # noqa: E402
from vlakit.heads import L1RegressionHead, read_slots  # noqa: E402
from vlakit.pruners import (  # noqa: E402
    FastVPruner,
    LightVLAPruner,
    RandomPruner,
    TopKPruner,
    image_block,
    lightvla_noise_scale,
    set_noise_scale,
)

P, D = 8, 16


def _sequence(batch=2, p=P, d=D, pad_last=0, clusters=3, seed=0):
    """``<s>``, ``p`` image tokens (drawn around a few centres, so a LightVLA query often
    picks a token other than itself), proprio, 4 prompt tokens, 3 slots, ``</s>``; the last
    row loses ``pad_last`` prompt tokens to right padding."""
    g = torch.Generator().manual_seed(seed)
    roles = ([TokenRole.BOS] + [TokenRole.IMAGE] * p + [TokenRole.PROPRIO]
             + [TokenRole.TEXT] * 4 + [TokenRole.ACTION] * 3 + [TokenRole.EOS])
    n = len(roles)
    embeds = torch.randn(batch, n, d, generator=g)
    centres = torch.randn(batch, clusters, d, generator=g) * 3
    embeds[:, 1:1 + p] = centres[:, torch.arange(p) % clusters] + 0.5 * torch.randn(
        batch, p, d, generator=g)
    role_ids = torch.tensor([int(r) for r in roles]).expand(batch, n).clone()
    valid = torch.ones(batch, n, dtype=torch.bool)
    if pad_last:
        keep = torch.ones(n, dtype=torch.bool)
        start = 2 + p
        keep[start:start + pad_last] = False
        order = torch.argsort((~keep).to(torch.int8), stable=True)
        embeds[-1] = embeds[-1, order] * keep[order, None]
        role_ids[-1] = torch.where(keep[order], role_ids[-1, order], int(TokenRole.PAD))
        valid[-1] = keep[order]
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    return TokenSequence(
        embeds=embeds, roles=role_ids, positions=positions, valid=valid,
        is_suffix=role_ids == int(TokenRole.ACTION),
        token_ids=torch.where(role_ids == int(TokenRole.TEXT), 7, -100),
        right_padded=True, num_image_tokens=p,
    )


# -- an independent LightVLA, one row at a time as the released code runs --------------------

def _rms(x, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _reference_scores(tokens, p):
    """tokens [1, n, d]: <s>, p patches, the rest (everything after the patches)."""
    d = tokens.shape[-1]
    _, patches, task = torch.split(tokens, [1, p, tokens.shape[1] - 1 - p], dim=1)
    patches, task = _rms(patches), _rms(task)
    queries = _rms(F.scaled_dot_product_attention(patches, task, task))
    return queries @ patches.transpose(-2, -1) * (1 / math.sqrt(d))


def _reference_eval(tokens, positions, p):
    score = _reference_scores(tokens, p)
    mask = torch.zeros(1, p, dtype=torch.bool)
    mask[0, score.argmax(-1)[0]] = True
    bos, patches, task = torch.split(tokens, [1, p, tokens.shape[1] - 1 - p], dim=1)
    bos_id, patches_id, task_id = torch.split(positions, [1, p, tokens.shape[1] - 1 - p], 1)
    kept = patches[mask].view(1, -1, tokens.shape[-1])
    kept_ids = patches_id[mask][None]
    return torch.cat([bos, kept, task], 1), torch.cat([bos_id, kept_ids, task_id], 1), mask[0]


def _reference_train(tokens, positions, p, noise_scale):
    score = _reference_scores(tokens, p)
    if noise_scale is not None:
        score = score + torch.rand_like(score) * noise_scale
    hard = F.one_hot(score.argmax(-1), num_classes=p)
    soft = torch.softmax(score, -1)
    weights = hard + soft - soft.detach()
    bos, patches, task = torch.split(tokens, [1, p, tokens.shape[1] - 1 - p], dim=1)
    bos_id, patches_id, task_id = torch.split(positions, [1, p, tokens.shape[1] - 1 - p], 1)
    picked = weights.argmax(-1)
    return (torch.cat([bos, weights @ patches, task], 1),
            torch.cat([bos_id, patches_id[0, picked[0]][None], task_id], 1))


def test_lightvla_eval_keeps_the_reference_set_with_original_positions():
    seq = _sequence(batch=2)
    out = LightVLAPruner().eval()(seq)
    counts = []
    for row in range(2):
        ref_tokens, ref_pos, ref_kept = _reference_eval(seq.embeds[row:row + 1],
                                                        seq.positions[row:row + 1], P)
        m = ref_tokens.shape[1]
        counts.append(int(ref_kept.sum()))
        real = out.valid[row]
        assert int(real.sum()) == m
        torch.testing.assert_close(out.embeds[row, real], ref_tokens[0], rtol=0, atol=1e-6)
        assert torch.equal(out.positions[row, real], ref_pos[0])
    assert 1 < min(counts) and max(counts) < P, counts  # a real choice, not all or one
    assert out.length == 1 + max(counts) + (seq.length - 1 - P)


def test_lightvla_eval_records_kept_set_and_keeps_fields_in_step():
    seq = _sequence(batch=2)
    pruner = LightVLAPruner().eval()
    out = pruner(seq)
    for row in range(2):
        _, _, ref_kept = _reference_eval(seq.embeds[row:row + 1], seq.positions[row:row + 1], P)
        assert torch.equal(pruner.last_kept[row], ref_kept)
        real = out.valid[row]
        # every non-image token kept, in order, with role, id, suffix flag and position
        keep_index = torch.cat([torch.tensor([0]), 1 + ref_kept.nonzero()[:, 0],
                                torch.arange(1 + P, seq.length)])
        for field in ("roles", "positions", "token_ids", "is_suffix"):
            assert torch.equal(getattr(out, field)[row, real], getattr(seq, field)[row, keep_index])
        assert not out.valid[row, real.sum():].any()
        assert (out.roles[row, ~real] == int(TokenRole.PAD)).all()
        assert (out.embeds[row, ~real] == 0).all()


@pytest.mark.parametrize("noise_scale", [None, 0.7])
def test_lightvla_training_mix_matches_reference(noise_scale):
    seq = _sequence(batch=1)
    pruner = LightVLAPruner(noise_scale=noise_scale).train()
    torch.manual_seed(3)
    out = pruner(seq)
    torch.manual_seed(3)
    ref_tokens, ref_pos = _reference_train(seq.embeds, seq.positions, P, noise_scale)
    assert out.length == seq.length  # training keeps the length
    torch.testing.assert_close(out.embeds, ref_tokens, rtol=0, atol=1e-6)
    assert torch.equal(out.positions, ref_pos)
    assert torch.equal(out.roles, seq.roles) and torch.equal(out.valid, seq.valid)


def test_lightvla_straight_through_gradient_reaches_the_scorer():
    """The mix's forward is one-hot; its backward is the softmax's, so the tokens after the
    images (which enter only the scores) get a gradient through the image block."""
    seq = _sequence(batch=1)
    embeds = seq.embeds.clone().requires_grad_(True)
    out = LightVLAPruner().train()(seq.replace(embeds=embeds))
    weights = torch.randn_like(out.embeds)
    (out.embeds[:, 1:1 + P] * weights[:, 1:1 + P]).sum().backward()
    assert embeds.grad[:, 1 + P:].abs().sum() > 0  # the scorer's keys: only via the softmax
    assert embeds.grad[:, 1:1 + P].abs().sum() > 0


def test_lightvla_noise_schedule_and_setter():
    assert lightvla_noise_scale(0, 100) == 1.0 and lightvla_noise_scale(100, 100) == 0.0
    assert lightvla_noise_scale(25, 100) == 0.75
    with pytest.raises(ValueError, match="max_steps"):
        lightvla_noise_scale(0, 0)
    model = _model("l1")
    model.add_pruner(LightVLAPruner())
    assert set_noise_scale(model, 0.3) == 1 and model.pruner.noise_scale == 0.3


def test_a_training_step_with_lightvla_backpropagates_into_projector_and_encoder():
    """A smoke test of the whole model in training mode (the straight-through path itself
    is proved by the test above)."""
    model = _model("l1")
    model.pruner = LightVLAPruner(noise_scale=0.5)
    model.train()
    loss = model(_inputs()).loss
    loss.backward()
    for name in ("projector", "encoder"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, name


# -- batches, decoders, caches ---------------------------------------------------------------

def _lightvla_model(head="l1", attention="bidirectional"):
    model = _model(head, attention)
    model.add_pruner(LightVLAPruner())
    return model.eval()


def _rows(inputs, row):
    return inputs.rows(slice(row, row + 1))


def test_batched_inference_equals_each_sample_alone():
    model = _lightvla_model()
    inputs = _inputs(batch=3, actions=False)
    batched = model.predict_action(inputs)
    counts = model.pruner.last_kept.sum(1).tolist()
    assert len(set(counts)) > 1, counts  # rows keep different counts: the case to prove
    runner = model.runner(inputs)
    hidden, seq = runner.run(_zero_slots(model, runner))
    for row in range(3):
        alone = model.predict_action(_rows(inputs, row))
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-4, atol=1e-5)
        runner = model.runner(_rows(inputs, row))
        h, s = runner.run(_zero_slots(model, runner))
        real = seq.valid[row]
        assert int(real.sum()) == s.length  # alone: no padding at all
        torch.testing.assert_close(hidden[row, real], h[0], rtol=1e-4, atol=1e-5)
        assert torch.equal(seq.positions[row, real], s.positions[0])


@pytest.mark.parametrize("head, attention, pruner", [
    ("l1", "bidirectional", LightVLAPruner), ("flow", "bidirectional", LightVLAPruner),
    ("flow", "causal", lambda: TopKPruner(0.5)),
])
def test_pruner_before_own_decoder_and_hfdecoder_agree(head, attention, pruner):
    """Same weights, loss and predicted actions. (A cached flow prefix scores LightVLA
    without the slots while HFDecoder's full re-run scores with them, so the cached case
    is compared with TopK, whose choice does not depend on the rest of the sequence.)"""
    own = _model(head, attention)
    own.pruner = pruner()
    hf = _hf_twin(own)
    inputs = _inputs()
    own.train(), hf.train()
    torch.manual_seed(5)
    loss_own = own(inputs).loss
    torch.manual_seed(5)
    loss_hf = hf(inputs).loss
    torch.testing.assert_close(loss_own, loss_hf, rtol=1e-4, atol=1e-5)
    own.eval(), hf.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flow head's full re-run fallback on HFDecoder
        want = own.predict_action(_inputs(actions=False), seeded(own, 6))
        got = hf.predict_action(_inputs(actions=False), seeded(hf, 6))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_pruned_prefix_is_what_gets_cached():
    model = _lightvla_model("diffusion", "parallel")
    inputs = _inputs(actions=False)
    runner = model.runner(inputs)
    prefix = runner.prefix()
    unpruned = copy.deepcopy(model)
    unpruned.pruner = torch.nn.Identity()
    full = unpruned.runner(inputs).prefix()
    assert prefix.cache.keys[0].shape[-2] == prefix.sequence.length < full.sequence.length
    kept = model.pruner.last_kept
    # each row's cached prefix holds its kept image tokens and nothing it dropped
    images = (prefix.sequence.roles == int(TokenRole.IMAGE)).sum(1)
    assert torch.equal(images, kept.sum(1))


def test_cached_prediction_with_a_pruner_equals_the_full_rerun():
    """TopK's choice does not depend on the suffix, so a pruned prefix cached once and the
    HFDecoder's full re-run per step (pruning the whole sequence every time) agree."""
    own = _model("flow", "parallel")
    own.pruner = TopKPruner(0.5)
    hf = _hf_twin(own)
    inputs = _inputs(actions=False)
    cached = own.predict_action(inputs, seeded(own, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = hf.predict_action(inputs, seeded(hf, 2))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_views_need_nothing_but_the_images():
    model = _model("l1")
    model.num_views = None
    model.add_pruner(LightVLAPruner())
    model.eval()
    inputs = _inputs(actions=False)
    two = model.predict_action(inputs)
    inputs.pixels = inputs.pixels[:, :1]
    one = model.predict_action(inputs)
    assert two.shape == one.shape == (3, 2, 3)
    assert model.pruner.last_kept.shape[1] == 4  # one view's patches, found by role


def test_batched_cached_prefix_equals_each_sample_alone():
    """Diffusion's cached layout on a padded, variable-length pruned prefix: each row's
    suffix step (same noisy actions and timestep) gives the hidden states it gives alone."""
    model = _lightvla_model("diffusion", "parallel")
    inputs = _inputs(batch=3, actions=False)
    head = model.head
    g = torch.Generator().manual_seed(4)
    noisy = torch.randn(3, 2, 3, generator=g)
    steps = torch.full((3,), 7)
    hidden, seq = model.runner(inputs).prefix(suffix_len=head.num_action_tokens + 2).run(
        head.tokens(noisy, steps, torch.float32))
    counts = model.pruner.last_kept.sum(1).tolist()
    assert len(set(counts)) > 1, counts
    for row in range(3):
        h, s = model.runner(_rows(inputs, row)).prefix().run(
            head.tokens(noisy[row:row + 1], steps[:1], torch.float32))
        torch.testing.assert_close(hidden[row:row + 1], h, rtol=1e-4, atol=1e-5)
        assert torch.equal(seq.positions[row:row + 1], s.positions)


@pytest.mark.parametrize("training", [False, True])
def test_lightvla_between_layers_equals_a_hand_split(training):
    model = _model("l1", "causal")
    model.pruner = LightVLAPruner(layer=1, noise_scale=0.3)
    model.train(training)
    inputs = _inputs(actions=False)
    runner = model.runner(inputs)
    seq = runner.sequence(_zero_slots(model, runner))
    torch.manual_seed(9)
    hidden, pruned = runner.run_decoder(seq)
    x = model.decoder(seq.embeds, model.mask_policy.spec(seq), seq.positions, end_layer=1)
    torch.manual_seed(9)
    manual = LightVLAPruner(noise_scale=0.3).train(training)(seq.replace(embeds=x))
    expected = model.decoder(manual.embeds, model.mask_policy.spec(manual), manual.positions,
                             start_layer=1)
    torch.testing.assert_close(hidden, expected)
    assert torch.equal(pruned.positions, manual.positions)
    assert (pruned.length < seq.length) != training  # evaluation shortens, training does not


def test_iterative_head_falls_back_to_full_reruns_with_a_pruner_between_layers():
    model = _model("flow", "parallel")
    model.pruner = TopKPruner(0.5, layer=1)
    model.eval()
    with pytest.warns(UserWarning, match="pruner sits between decoder layers"):
        actions = model.predict_action(_inputs(actions=False))
    assert actions.shape == (3, 2, 3)


def test_lightvla_bf16_at_batch_1_is_the_reference_computation():
    """At batch 1 without padding the scorer makes the reference's own unmasked SDPA call
    over the tokens after the images, so bf16 scores and the kept set match exactly."""
    seq = _sequence(batch=1, d=64)
    seq = seq.replace(embeds=seq.embeds.to(torch.bfloat16))
    out = LightVLAPruner().eval()(seq)
    ref_tokens, ref_pos, _ = _reference_eval(seq.embeds, seq.positions, P)
    assert out.embeds.dtype == torch.bfloat16
    assert torch.equal(out.embeds, ref_tokens) and torch.equal(out.positions, ref_pos)
    block = image_block(seq)
    assert torch.equal(LightVLAPruner().scores(seq, block), _reference_scores(seq.embeds, P))


def test_length_multiple_pads_the_pruned_length():
    seq = _sequence(batch=2)
    exact = LightVLAPruner().eval()(seq)
    padded = LightVLAPruner(length_multiple=8).eval()(seq)
    assert padded.length % 8 == 0 and padded.length >= exact.length
    for field in ("embeds", "positions", "roles"):
        real = getattr(padded, field)[padded.valid]
        assert torch.equal(real, getattr(exact, field)[exact.valid])
    with pytest.raises(ValueError, match="length_multiple"):
        LightVLAPruner(length_multiple=0)


def test_next_read_needs_a_token_after_the_slots():
    seq = _sequence(batch=1)
    cut = seq.gather(torch.arange(seq.length - 1)[None])  # drop </s>: the slots end the row
    hidden = torch.randn(1, cut.length, 4)
    with pytest.raises(ValueError, match="nothing follows it"):
        read_slots(hidden, cut, 3, "next")


# -- fixed-count pruners ---------------------------------------------------------------------

def test_topk_keeps_the_highest_scores_in_order_with_static_shapes():
    seq = _sequence(batch=2, pad_last=2)
    out = TopKPruner(keep=3)(seq)
    assert out.length == seq.length - (P - 3) and out.num_image_tokens == 3
    assert out.right_padded and torch.equal(out.valid.sum(1), seq.valid.sum(1) - (P - 3))
    norms = seq.embeds[:, 1:1 + P].norm(dim=-1)
    for row in range(2):
        top = norms[row].topk(3).indices.sort().values
        assert torch.equal(out.positions[row, 1:4], seq.positions[row, 1 + top])
        torch.testing.assert_close(out.embeds[row, 1:4], seq.embeds[row, 1 + top])
        assert torch.equal(out.roles[row, 4:], seq.roles[row, 1 + P:])
    assert TopKPruner(0.25).count(512) == 128 and TopKPruner(0.15).count(512) == 77
    assert TopKPruner(0.01).count(8) == 1


def test_topk_with_a_given_score():
    seq = _sequence(batch=1)
    first = TopKPruner(keep=2, score=lambda tokens, s: -torch.arange(tokens.shape[1]).float()
                       .expand(tokens.shape[:2]))
    out = first(seq)
    assert torch.equal(out.positions[0, 1:3], torch.tensor([1, 2]))


def test_random_pruner_draws_from_the_seed():
    seq = _sequence(batch=2)
    torch.manual_seed(0)
    a = RandomPruner(0.5)(seq).positions
    torch.manual_seed(0)
    b = RandomPruner(0.5)(seq).positions
    torch.manual_seed(1)
    c = RandomPruner(0.5)(seq).positions
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- the attention tap and FastV -------------------------------------------------------------

def test_attention_tap_equals_transformers_eager_attention():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(config).eval()
    own = decoder_from_transformers(hf).eval()
    x = torch.randn(2, 10, 32)
    positions = torch.arange(10).expand(2, 10)
    seq_valid = torch.ones(2, 10, dtype=torch.bool)
    queries = torch.tensor([[9, 4], [7, 0]])
    with torch.no_grad():
        ref = hf.model(inputs_embeds=x, position_ids=positions, output_attentions=True)
        for layer in range(3):
            tap = AttentionTap(layer, queries)
            plain = own(x, CausalMask().spec(_plain(seq_valid, x)), positions)
            tapped = own(x, CausalMask().spec(_plain(seq_valid, x)), positions, tap=tap)
            assert torch.equal(plain, tapped)  # the tap changes nothing of the output
            expected = torch.stack([ref.attentions[layer][r, :, queries[r]] for r in range(2)])
            torch.testing.assert_close(tap.weights, expected, rtol=1e-4, atol=1e-6)
    # a dense mask (bidirectional, with padding) reaches the tap as it reaches SDPA
    seq_valid[1, 7:] = False
    dense = BidirectionalMask()(_plain(seq_valid, x))
    additive = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = hf.model(inputs_embeds=x, attention_mask=additive[:, None], position_ids=positions,
                       output_attentions=True)
        tap = AttentionTap(1, queries)
        own(x, BidirectionalMask().spec(_plain(seq_valid, x)), positions, tap=tap)
    expected = torch.stack([ref.attentions[1][r, :, queries[r]] for r in range(2)])
    torch.testing.assert_close(tap.weights, expected, rtol=1e-4, atol=1e-6)
    assert (tap.weights[1, :, 1, 7:] == 0).all()  # query 0 of row 1 is real: blind to pads


def _plain(valid, x):
    b, n = valid.shape
    return TokenSequence(embeds=x, roles=torch.full((b, n), int(TokenRole.TEXT)),
                         positions=torch.arange(n).expand(b, n), valid=valid,
                         is_suffix=torch.zeros_like(valid), token_ids=torch.zeros(b, n).long(),
                         right_padded=True)


def test_fastv_prunes_after_layer_k_by_the_last_prompt_token_attention():
    """FastV in a VLA = a hand split: layer 0 on every token, the image tokens ranked by
    transformers' eager attention of the last prompt token (heads averaged), then layer 1
    on the kept ones."""
    model = _model("l1", "causal")
    model.pruner = FastVPruner(layer=1, keep_ratio=0.5)
    model.eval()
    inputs = _inputs(actions=False)
    runner = model.runner(inputs)
    seq = runner.sequence(_zero_slots(model, runner))
    hidden, pruned = runner.run_decoder(seq)
    hf = _hf_llama()
    hf.config._attn_implementation = "eager"
    dense = model.mask_policy(seq)
    additive = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = hf.model(inputs_embeds=seq.embeds, attention_mask=additive[:, None],
                       position_ids=seq.positions, output_attentions=True)
        is_text = (seq.roles == int(TokenRole.TEXT)) & seq.valid
        last = torch.where(is_text, torch.arange(seq.length), -1).amax(1)
        block = image_block(seq)
        kept = []
        for row in range(seq.batch_size):
            received = ref.attentions[0][row, :, last[row]].mean(0)[block.index[row]]
            top = received.topk(4).indices
            kept.append(torch.zeros(8, dtype=torch.bool).scatter(0, top, True))
        assert torch.equal(model.pruner.last_kept, torch.stack(kept))
        x = model.decoder(seq.embeds, model.mask_policy.spec(seq), seq.positions, end_layer=1)
        drop = block.scatter(~torch.stack(kept), seq.length)
        order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, : seq.length - 4]
        manual = seq.replace(embeds=x).gather(order).replace(right_padded=True)
        expected = model.decoder(manual.embeds, model.mask_policy.spec(manual),
                                 manual.positions, start_layer=1)
    torch.testing.assert_close(hidden, expected)
    assert torch.equal(pruned.positions, manual.positions)
    actions = model.predict_action(inputs)
    assert actions.shape == (3, 2, 3) and torch.isfinite(actions).all()


# -- the builders and the LightVLA read -------------------------------------------------------

def test_lightvla_7b_on_meta():
    from vlakit.models import lightvla_7b, openvla_oft_7b

    model = lightvla_7b(device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_709_173_191
    assert isinstance(model.pruner, LightVLAPruner) and model.pruner.layer == 0
    assert model.num_views is None and model.head.predict_read == "next"
    assert model.head.read == "previous"
    same = openvla_oft_7b(device="meta")
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in same.state_dict().items()}
    aloha = lightvla_7b(num_views=3, proprio_dim=14, chunk_size=25, action_dim=14, film=True,
                        device="meta")
    assert aloha.head.num_action_tokens == 350 and aloha.encoder.has_film
    assert lightvla_7b(head="flow", attention="parallel", device="meta").head.layout == "cached"


def test_next_read_is_lightvlas_released_predict_read():
    seq = _sequence(batch=1)
    hidden = torch.arange(seq.length).float()[None, :, None].expand(1, -1, 2)
    slots = (seq.roles[0] == int(TokenRole.ACTION)).nonzero()[:, 0]
    nxt = read_slots(hidden, seq, 3, "next")[0, :, 0]
    assert torch.equal(nxt, (slots + 1).float())  # slots 2..m and </s>: the last m positions
    assert nxt[-1] == seq.length - 1
    assert torch.equal(read_slots(hidden, seq, 3, "previous")[0, :, 0], (slots - 1).float())
    head = L1RegressionHead(D, 3, 1, predict_read="next")
    assert head.read == "previous" and head.predict_read == "next"
    with pytest.raises(ValueError, match="predict_read"):
        L1RegressionHead(D, 3, 1, predict_read="later")


def test_tiny_lightvla_predicts_with_the_released_read():
    model = _lightvla_model()
    model.head.predict_read = "next"
    inputs = _inputs(actions=False)
    runner = model.runner(inputs)
    hidden, seq = runner.run(_zero_slots(model, runner))
    expected = model.head.actions_from(hidden, seq, "next")
    torch.testing.assert_close(model.predict_action(inputs), expected)
    assert not torch.allclose(expected, model.head.actions_from(hidden, seq, "previous"))


# -- bad input -------------------------------------------------------------------------------

def test_no_image_tokens_pass_through_with_one_warning_or_raise_when_strict():
    seq = _sequence(batch=1)
    text = seq.replace(roles=torch.where(seq.roles == int(TokenRole.IMAGE), int(TokenRole.TEXT),
                                         seq.roles), num_image_tokens=0)
    pruner = LightVLAPruner()
    with pytest.warns(UserWarning, match="no IMAGE tokens"):
        assert pruner(text) is text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pruner(text) is text  # once
    with pytest.raises(ValueError, match="no IMAGE tokens"):
        TopKPruner(0.5, strict=True)(text)
    counted = text.replace(roles=text.roles)  # count unknown: found from the roles
    assert counted.num_image_tokens is None
    with pytest.raises(ValueError, match="no IMAGE tokens"):
        LightVLAPruner(strict=True)(counted)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_keep_ratio_outside_0_1_raises(ratio):
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        TopKPruner(ratio)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        FastVPruner(keep_ratio=ratio)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        RandomPruner(ratio)


def test_bad_pruner_placements_raise():
    model = _model("l1")
    parts = dict(encoder=model.encoder, projector=model.projector,
                 interleaver=model.interleaver, decoder=model.decoder,
                 mask_policy=model.mask_policy, head=model.head)
    with pytest.raises(ValueError, match=r"layer=2, but the decoder has 2 layers \(0..1\)"):
        VLA(**parts, pruner=TopKPruner(0.5, layer=2))
    with pytest.raises(ValueError, match="FastVPruner reads the attention"):
        FastVPruner(layer=0)
    hf = dict(parts, decoder=HFDecoder(_hf_llama()))
    with pytest.raises(ValueError, match="runs only whole passes"):
        VLA(**hf, pruner=TopKPruner(0.5, layer=1))
    with pytest.raises(ValueError, match="pass exactly one"):
        TopKPruner(0.5, keep=3)
    with pytest.raises(ValueError, match="keep must be"):
        TopKPruner(keep=0)


def test_a_tap_on_a_missing_layer_raises():
    decoder = decoder_from_transformers(_hf_llama())
    x = torch.randn(1, 5, 64)
    valid = torch.ones(1, 5, dtype=torch.bool)
    spec = CausalMask().spec(_plain(valid, x))
    with pytest.raises(ValueError, match=r"tap asks for layer 7.*2 \(0..1\)"):
        decoder(x, spec, torch.arange(5)[None], tap=AttentionTap(7, torch.tensor([[4]])))
    with pytest.raises(ValueError, match=r"layer 1, but this call runs layers \[0, 1\)"):
        decoder(x, spec, torch.arange(5)[None], end_layer=1,
                tap=AttentionTap(1, torch.tensor([[4]])))


def test_a_pruner_between_layers_refuses_cached_paths():
    model = _model("l1", "causal")
    model.pruner = TopKPruner(0.5, layer=1)
    with pytest.raises(ValueError, match="different key counts"):
        model.generate(_inputs(actions=False), 2)
    assert not model.runner(_inputs(actions=False)).supports_prefix_cache


# -- pictures --------------------------------------------------------------------------------

def test_plot_kept_patches_one_panel_per_view_with_counts():
    from vlakit.viz import plot_kept_patches

    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    kept = torch.zeros(32, dtype=torch.bool)
    kept[[0, 5, 20]] = True
    fig = plot_kept_patches(images, kept, titles=["left", "wrist"])
    assert [ax.get_title() for ax in fig.axes] == ["left: 2/16 kept", "wrist: 1/16 kept"]
    assert len(fig.axes[0].patches) == 2  # an outline per kept patch
    with pytest.raises(ValueError, match="not a square grid"):
        plot_kept_patches(images, torch.ones(24, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not split into 2 views"):
        plot_kept_patches(images, torch.ones(33, dtype=torch.bool))
    fig = plot_kept_patches(images[0].float() / 255, torch.ones(8, dtype=torch.bool), grid=(2, 4))
    assert fig.axes[0].get_title() == "view 0: 8/8 kept"
