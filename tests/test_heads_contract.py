"""The head contract: heads place tokens, own their loss, and predict through a runner."""

import pytest
import torch
from _tiny import VOCAB_SIZE
from torch import nn

from vlakit import VLA, VLAInputs, VLARunner
from vlakit.actions import ActionNormalizer
from vlakit.core import CausalMask, RoleBlockMask, TokenRole
from vlakit.decoders import llama
from vlakit.heads import ActionHead, Head, HeadTokens, ModelRunner, NextTokenHead, Sampling
from vlakit.interleave import PrefixInterleaver
from vlakit.projectors import LinearProjector
from vlakit.vision import vit

CHUNK, ADIM, D = 2, 3, 64
PREFIX_ROLES = {TokenRole.BOS, TokenRole.IMAGE, TokenRole.TEXT, TokenRole.PROPRIO}


class SlotRegressionHead(nn.Module):
    """A minimal L1-style head written only against the contract: zero slots, one pass."""

    num_action_tokens = CHUNK * ADIM
    chunk_size, action_dim = CHUNK, ADIM

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(D, 1)

    def has_targets(self, inputs):
        return inputs.actions is not None

    def _read(self, hidden, seq):
        index = seq.role_mask(TokenRole.ACTION).float().argsort(dim=1, descending=True,
                                                                stable=True)
        index = index[:, : self.num_action_tokens].sort(dim=1).values
        picked = torch.gather(hidden, 1, index[..., None].expand(-1, -1, D))
        return self.out(picked).reshape(-1, CHUNK, ADIM)

    def loss(self, runner, sampling):
        return (self.predict(runner, sampling) - runner.target_actions()).abs().mean()

    def predict(self, runner, sampling):
        b = runner.batch_size
        slots = torch.zeros(b, self.num_action_tokens, D, device=runner.device,
                            dtype=runner.dtype)
        tokens = HeadTokens(action_embeds=slots)
        hidden, seq = runner.run(tokens)
        return self._read(hidden, seq)


def _model(head, policy=None):
    torch.manual_seed(0)
    return VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, D), PrefixInterleaver(bos_id=1, eos_id=None),
        llama(vocab_size=VOCAB_SIZE, dim=D, num_layers=2, num_heads=4, num_kv_heads=2,
              mlp_dim=128),
        policy or CausalMask(), head=head,
        action_normalizer=ActionNormalizer({"q01": [-2.0] * ADIM, "q99": [2.0] * ADIM}),
    ).eval()


def _inputs(actions=False):
    g = torch.Generator().manual_seed(3)
    return VLAInputs(
        input_ids=torch.randint(3, 200, (2, 6), generator=g),
        text_valid=torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool),
        pixels=torch.randn(2, 1, 3, 28, 28, generator=g),
        actions=torch.rand(2, CHUNK, ADIM, generator=g) if actions else None,
    )


def test_heads_satisfy_the_protocols():
    assert isinstance(SlotRegressionHead(), ActionHead)
    assert isinstance(NextTokenHead(), Head) and not isinstance(NextTokenHead(), ActionHead)
    model = _model(SlotRegressionHead())
    assert isinstance(model.runner(_inputs()), ModelRunner)


def test_predict_action_is_head_agnostic_and_unnormalises():
    model = _model(SlotRegressionHead())
    normalised = model.head.predict(VLARunner(model, _inputs()), Sampling())
    predicted = model.predict_action(_inputs())
    assert predicted.shape == (2, CHUNK, ADIM)
    torch.testing.assert_close(predicted, model.action_normalizer.unnormalize(normalised))
    loss = model(_inputs(actions=True)).loss
    loss.backward()
    assert model.head.out.weight.grad is not None and torch.isfinite(loss)
    out = model(_inputs())  # no targets: the prompt alone is run
    assert out.loss is None and out.sequence.role_mask(TokenRole.ACTION).sum() == 0
    assert out.hidden.shape[:2] == out.sequence.embeds.shape[:2]


def test_a_vlm_gets_the_next_token_head_and_predicts_no_actions():
    model = _model(None)
    assert isinstance(model.head, NextTokenHead)
    with pytest.raises(TypeError, match="predicts no actions; use generate"):
        model.predict_action(_inputs())


@pytest.mark.parametrize("repeats", [1, 3])
def test_suffix_against_the_read_only_prefix_equals_a_full_pass(repeats):
    # pi0-style blocks: the prefix never sees the suffix; actions see everything.
    policy = RoleBlockMask([PREFIX_ROLES, {TokenRole.ACTION}])
    model = _model(SlotRegressionHead(), policy)
    inputs = _inputs()
    runner = model.runner(inputs)
    prefix = runner.prefix(repeats)
    assert prefix.batch_size == 2 * repeats
    suffix = torch.randn(2 * repeats, CHUNK * ADIM, D)
    got = prefix.run_suffix(suffix, TokenRole.ACTION)
    again = prefix.run_suffix(suffix, TokenRole.ACTION)  # the prefix is read-only
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    for r in range(repeats):
        rows = torch.arange(2) * repeats + r
        hidden, seq = runner.run(HeadTokens(action_embeds=suffix[rows]))
        slots = seq.role_mask(TokenRole.ACTION)
        expected = hidden[slots].reshape(2, CHUNK * ADIM, D)
        torch.testing.assert_close(got[rows], expected, rtol=1e-5, atol=1e-5)


def test_suffix_batch_must_match_the_prefix():
    model = _model(SlotRegressionHead(), RoleBlockMask([PREFIX_ROLES, {TokenRole.ACTION}]))
    prefix = model.runner(_inputs()).prefix(2)
    with pytest.raises(ValueError, match="suffix batch is 2 rows but the prefix holds 4"):
        prefix.run_suffix(torch.randn(2, 1, D), TokenRole.ACTION)


def test_an_action_expert_runs_the_suffix_against_the_same_prefix_cache():
    """pi0's shape: a second decoder (another width, same layers and key/value heads)
    attends to the prefix keys of the model's layers."""
    policy = RoleBlockMask([PREFIX_ROLES, {TokenRole.ACTION}])
    model = _model(SlotRegressionHead(), policy)
    prefix = model.runner(_inputs()).prefix()
    suffix = torch.randn(2, CHUNK * ADIM, D)
    same = prefix.run_suffix(suffix, TokenRole.ACTION, decoder=model.decoder)
    torch.testing.assert_close(same, prefix.run_suffix(suffix, TokenRole.ACTION))
    torch.manual_seed(1)
    expert = llama(vocab_size=8, dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                   head_dim=16, mlp_dim=64)
    out = prefix.run_suffix(torch.randn(2, CHUNK * ADIM, 32), TokenRole.ACTION, decoder=expert)
    assert out.shape == (2, CHUNK * ADIM, 32) and torch.isfinite(out).all()


def test_a_vlm_batch_without_suffix_has_zero_loss_not_nan():
    model = _model(None)
    inputs = _inputs()
    inputs.token_type_ids = torch.zeros_like(inputs.input_ids)
    loss = model(inputs).loss
    assert loss is not None and loss.item() == 0.0


def test_an_hf_decoder_refuses_a_prefix_cache_with_a_clear_error():
    from _tiny import tiny_decoder

    torch.manual_seed(0)
    model = VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, D), PrefixInterleaver(bos_id=1, eos_id=None),
        tiny_decoder("hf", dim=D), CausalMask(), head=SlotRegressionHead(),
    )
    with pytest.raises(RuntimeError, match="HFDecoder cannot keep a prefix cache"):
        model.runner(_inputs()).prefix(2)


class ExpertRegressionHead(nn.Module):
    """pi0's shape at toy size: an action expert (its own decoder, narrower) runs zero slots
    against the prefix cache, in training (the same loss entry as every head) and in
    prediction."""

    num_action_tokens = CHUNK * ADIM
    chunk_size, action_dim = CHUNK, ADIM

    def __init__(self) -> None:
        super().__init__()
        self.expert = llama(vocab_size=8, dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                            head_dim=16, mlp_dim=64)
        self.out = nn.Linear(32, 1)

    def has_targets(self, inputs):
        return inputs.actions is not None

    def _actions(self, runner):
        prefix = runner.prefix()
        slots = torch.zeros(runner.batch_size, self.num_action_tokens, 32)
        hidden = prefix.run_suffix(slots, TokenRole.ACTION, decoder=self.expert)
        return self.out(hidden).reshape(-1, CHUNK, ADIM)

    def loss(self, runner, sampling):
        return (self._actions(runner) - runner.target_actions()).abs().mean()

    def predict(self, runner, sampling):
        return self._actions(runner)


def test_a_head_trains_an_action_expert_against_the_prefix_cache():
    policy = RoleBlockMask([PREFIX_ROLES, {TokenRole.ACTION}])
    model = _model(ExpertRegressionHead(), policy).train()
    assert isinstance(model.head, ActionHead)
    inputs = _inputs(actions=True)
    out = model(inputs)
    assert out.sequence.role_mask(TokenRole.ACTION).sum() == 0  # the prefix alone
    assert out.hidden.shape[:2] == out.sequence.embeds.shape[:2]
    out.loss.backward()
    # gradients reach the expert, the main decoder (through the cached keys and values of
    # every layer) and the vision encoder
    assert model.head.expert.layers[1].attn.q_proj.weight.grad.abs().sum() > 0
    assert model.decoder.layers[1].attn.k_proj.weight.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    # training and prediction read the same path
    normalised = model.action_normalizer.normalize(inputs.actions)
    expected = (model.head.predict(model.runner(inputs), Sampling()) - normalised).abs().mean()
    torch.testing.assert_close(out.loss, expected)
    assert model.predict_action(_inputs()).shape == (2, CHUNK, ADIM)


def test_the_runner_hands_back_chosen_middle_layers():
    """GR00T-style heads read middle-layer features: run_layers gives layer i's output,
    equal to running the layer range by hand."""
    model = _model(SlotRegressionHead())
    runner = model.runner(_inputs())
    tokens = HeadTokens()
    hidden, seq, states = runner.run_layers(tokens, (0, 1))
    full, _ = runner.run(tokens)
    torch.testing.assert_close(hidden, full)
    spec = model.mask_policy.spec(seq)
    first = model.decoder(seq.embeds, spec, seq.positions, end_layer=1)
    torch.testing.assert_close(states[0], first)
    assert set(states) == {0, 1} and states[1].shape == hidden.shape
    with pytest.raises(ValueError, match="layer"):
        runner.run_layers(tokens, (5,))
