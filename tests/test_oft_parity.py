"""OpenVLA-OFT at tiny size vs the published algorithm, written out here in plain torch.

The reference runs a transformers ``LlamaModel`` on input embeddings assembled by hand
(``<s>``, patches of every view from timm, proprio, [timestep], prompt ending in the "▁"
token, ``chunk * a`` slots, ``</s>``) under an explicit 4-D additive mask, reads slot ``j``
from position ``j - 1`` and runs its own MLPResNet, sinusoidal embedding, DDIM noising and
DDIM update. Facts pinned: openvla-oft ``modeling_prismatic.py``, ``action_heads.py``,
``projectors.py``, ``finetune.py`` and ``experiments/robot/openvla_utils.py`` (see
REFERENCE.md, "OpenVLA-OFT"). Vision-tower parity itself is pinned in test_openvla.py.
"""

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import LlamaConfig, LlamaForCausalLM

from vlakit.actions import ActionNormalizer
from vlakit.batch import VLAInputs
from vlakit.convert import decoder_from_transformers, vit_from_timm
from vlakit.core import TokenRole
from vlakit.heads import MLPResNet, Sampling
from vlakit.heads.time_embedding import sinusoidal_embedding
from vlakit.models import oft_head, oft_mask, openvla_oft
from vlakit.projectors import MLPProjector, ProprioProjector

PAD, BOS, EOS, SPACE = 0, 1, 2, 29  # SPACE plays the role of Llama-2's 29871 ("▁")
D, D_VIS, CHUNK, ADIM, PDIM, VIEWS = 32, 24, 2, 3, 4, 2
K = CHUNK * ADIM  # action slots
PATCHES = 4  # per view: 28 px / 14 px patches
T_TRAIN = 50
ATOL = 1e-5

ACTION_STATS = {"q01": [-0.5, 0.0, -2.0], "q99": [0.5, 1.0, 2.0], "mask": [True, True, False]}
PROPRIO_STATS = {"q01": [-1.0, 0.0, 0.0, 2.0], "q99": [1.0, 4.0, 2.0, 2.0],
                 "mask": [True, True, False, True]}


# -- the tiny model --------------------------------------------------------------------------


def _vit() -> VisionTransformer:
    return VisionTransformer(
        img_size=28, patch_size=14, embed_dim=D_VIS, depth=3, num_heads=4, mlp_ratio=2,
        class_token=True, num_classes=0, dynamic_img_size=False,
    ).eval()


def _llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def _jitter(module: torch.nn.Module, scale: float = 0.2) -> None:
    """Move every parameter off its init (LayerNorm weights off one, biases off zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _build(head="l1", attention="bidirectional", steps=None, film=False, **normalizers):
    torch.manual_seed(0)
    vit, hf = _vit(), _llama()
    encoder = vit_from_timm(vit, output_layer=-2)
    if film:
        encoder.add_film(D)
    model = openvla_oft(
        encoder=encoder,
        projector=MLPProjector([D_VIS, 48, D]),
        decoder=decoder_from_transformers(hf),
        head=oft_head(head, D, CHUNK, ADIM, attention, num_inference_steps=steps),
        proprio_projector=ProprioProjector(PDIM, D),
        attention=attention,
        num_views=VIEWS,
        bos_id=BOS,
        eos_id=EOS,
        **normalizers,
    ).eval()
    _jitter(model.head)
    _jitter(model.proprio_projector)
    if film:
        _jitter(model.encoder, 0.05)
    return model, vit, hf


def _inputs(actions=None) -> VLAInputs:
    """Two rows, right-padded prompts of 5 and 3 tokens, each ending in SPACE."""
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[10, 11, 12, 13, SPACE], [20, 21, SPACE, PAD, PAD]])
    return VLAInputs(
        input_ids=ids,
        text_valid=ids != PAD,
        pixels=torch.randn(2, VIEWS, 3, 28, 28, generator=g),
        proprio=torch.randn(2, PDIM, generator=g) * 2,
        actions=actions,
    )


def _actions() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(2, CHUNK, ADIM, generator=g) * 2 - 1


# -- the reference, from the published algorithm -------------------------------------------


def _gelu(x):
    """Exact (erf) GELU, torch.nn.GELU()'s default."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _layer_norm(x, ln, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * ln.weight + ln.bias


def _ref_mlp_resnet(m, x):
    """LN1 -> fc1 -> ReLU -> [x + ReLU(Linear(LN(x)))] * n -> LN2 -> fc2."""
    x = torch.relu(_linear(_layer_norm(x, m.layer_norm1), m.fc1))
    for block in m.mlp_resnet_blocks:
        ln, fc = block.ffn[0], block.ffn[1]
        x = torch.relu(_linear(_layer_norm(x, ln), fc)) + x
    return _linear(_layer_norm(x, m.layer_norm2), m.fc2)


def _ref_patches(model, vit, pixels_row):
    """[v, 3, h, w] -> [v * p, D]: second-to-last block of the tower (timm), prefix dropped,
    then fc1-GELU-fc2; views one after the other."""
    feats = vit.get_intermediate_layers(pixels_row, n={len(vit.blocks) - 2})[0]  # [v, p, dv]
    p = model.projector
    return _linear(_gelu(_linear(feats, p.fc1)), p.fc2).reshape(-1, D)


def _ref_proprio(model, proprio_row):
    p = model.proprio_projector
    return _linear(_gelu(_linear(proprio_row, p.fc1)), p.fc2)  # [D]


def _ref_noisy_slots(head, noisy_row):
    """NoisyActionProjector per scalar: [chunk, a] -> [chunk * a, D], 1 -> D -> D."""
    proj = head.noisy_action_projector
    x = noisy_row.reshape(-1, 1)
    return _linear(_gelu(x * proj.fc1.weight[:, 0] + proj.fc1.bias), proj.fc2)


def _ref_time(t: float, dim: int = D):
    """SinusoidalPositionalEncoding: freq_i = exp(-ln(10000) i / (half - 1)), [sin, cos]."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -math.log(10000) / (half - 1))
    angles = torch.tensor(float(t)) * freq
    return torch.cat((angles.sin(), angles.cos()))


def _ref_alphas_cumprod(T: int = T_TRAIN):
    """squaredcos_cap_v2: beta_i = min(1 - abar(i+1/T) / abar(i/T), 0.999)."""
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


def _ref_leading_timesteps(n: int, T: int = T_TRAIN):
    ratio = T // n
    return [i * ratio for i in range(n)][::-1]


def _ref_ddim_step(eps, t, x, n, abar):
    """eta 0, clip_sample (range 1), set_alpha_to_one, epsilon prediction."""
    prev = t - T_TRAIN // n
    a_t = abar[t].item()
    a_prev = abar[prev].item() if prev >= 0 else 1.0
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    clipped = bool((x0.abs() > 1).any())
    x0 = x0.clamp(-1, 1)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, clipped


def _ref_row_embeds(model, vit, hf, inputs, row, slots, time=None):
    """``<s>``, patches (all views), proprio, [timestep], real prompt, slots, ``</s>``."""
    embed = hf.get_input_embeddings()
    prompt = inputs.input_ids[row][inputs.text_valid[row]]
    proprio = inputs.proprio[row]
    if model.proprio_normalizer is not None:
        proprio = _ref_normalize_eval(proprio, PROPRIO_STATS)
    parts = [
        embed(torch.tensor([BOS])),
        _ref_patches(model, vit, inputs.pixels[row]),
        _ref_proprio(model, proprio)[None],
        *([] if time is None else [time[None]]),
        embed(prompt),
        slots,
        embed(torch.tensor([EOS])),
    ]
    return torch.cat(parts, 0)


def _ref_hidden(hf, embeds, bidirectional=True):
    """Final (post-norm) hidden states of the transformers Llama, positions 0..N-1. The
    bidirectional mask is an explicit 4-D additive mask of zeros (transformers 5 returns a
    4-D mask as given; an additive float mask works under eager and SDPA alike)."""
    n = embeds.shape[0]
    mask = torch.zeros(1, 1, n, n) if bidirectional else None
    return hf.model(inputs_embeds=embeds[None], attention_mask=mask).last_hidden_state[0]


def _ref_read(hidden, slot_start):
    """Slot j is read at position j - 1 (the first from the prompt's last token), grouped
    per chunk step: [chunk, a * D]."""
    return hidden[slot_start - 1 : slot_start - 1 + K].reshape(CHUNK, ADIM * D)


def _slot_start(inputs, row, with_time=False):
    return 1 + VIEWS * PATCHES + 1 + int(with_time) + int(inputs.text_valid[row].sum())


def _ref_normalize_eval(p, stats):
    """openvla_utils.normalize_proprio: clip(where(mask, 2(p-low)/(high-low+1e-8)-1, p))."""
    low, high = torch.tensor(stats["q01"]), torch.tensor(stats["q99"])
    mask = torch.tensor(stats["mask"])
    return torch.where(mask, 2 * (p - low) / (high - low + 1e-8) - 1, p).clamp(-1, 1)


def _ref_normalize_pipeline(x, stats):
    """RLDS pipeline: where(mask, clip(2(x-low)/(high-low+1e-8)-1), x), then 0 where the
    statistic's min == max (here: low == high, no min/max given)."""
    low, high = torch.tensor(stats["q01"]), torch.tensor(stats["q99"])
    mask = torch.tensor(stats["mask"])
    y = torch.where(mask, (2 * (x - low) / (high - low + 1e-8) - 1).clamp(-1, 1), x)
    return torch.where(low == high, torch.zeros_like(y), y)


def _ref_unnormalize(y, stats):
    low, high = torch.tensor(stats["q01"]), torch.tensor(stats["q99"])
    mask = torch.tensor(stats["mask"])
    return torch.where(mask, 0.5 * (y + 1) * (high - low + 1e-8) + low, y)


# -- tests -----------------------------------------------------------------------------------


def test_reference_llama_takes_an_explicit_4d_mask():
    """The reference's bidirectional pass is real: under transformers 5 a 4-D additive mask
    is used as given (a causal one reproduces the default causal pass, the all-zeros one
    differs from it)."""
    _, _, hf = _build()
    x = torch.randn(9, D)
    with torch.no_grad():
        causal = _ref_hidden(hf, x, bidirectional=False)
        additive = torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None]
        explicit = hf.model(inputs_embeds=x[None], attention_mask=additive).last_hidden_state[0]
        both_ways = _ref_hidden(hf, x)
    torch.testing.assert_close(explicit, causal, atol=1e-6, rtol=0)
    assert (both_ways - causal).abs().max() > 1e-3


@pytest.mark.parametrize("head", ["l1", "diffusion"])
def test_sequence_layout_roles_positions_and_bidirectional_mask(head):
    """Layout ``<s>``, patches of every view, proprio, [timestep], prompt (ending in "▁"),
    ``chunk * a`` slots, ``</s>``; RoPE positions 0..N-1 over real tokens; each padded row's
    slots follow its own prompt; under oft_mask("bidirectional") every real token sees every
    real token and no padding."""
    model, *_ = _build(head)
    inputs = _inputs(_actions())
    with torch.no_grad():
        seq = model(inputs).sequence
    mask = model.mask_policy.spec(seq).dense()
    assert isinstance(model.mask_policy, type(oft_mask("bidirectional")))
    with_time = head == "diffusion"
    R = TokenRole
    for row in range(2):
        n_text = int(inputs.text_valid[row].sum())
        roles = ([R.BOS] + [R.IMAGE] * (VIEWS * PATCHES) + [R.PROPRIO]
                 + [R.TIMESTEP] * with_time + [R.TEXT] * n_text + [R.ACTION] * K + [R.EOS])
        n = len(roles)
        assert seq.roles[row, :n].tolist() == [int(r) for r in roles]
        assert (seq.roles[row, n:] == int(R.PAD)).all()
        assert seq.valid[row].tolist() == [True] * n + [False] * (seq.length - n)
        assert seq.positions[row, :n].tolist() == list(range(n))
        text = seq.token_ids[row][seq.roles[row] == int(R.TEXT)].tolist()
        assert text == inputs.input_ids[row, :n_text].tolist() and text[-1] == SPACE
        assert seq.token_ids[row, 0] == BOS and seq.token_ids[row, n - 1] == EOS
        assert _slot_start(inputs, row, with_time) == int(
            (seq.roles[row] == int(R.ACTION)).nonzero()[0])
        assert mask[row, :n, :n].all()
        assert not mask[row, :n, n:].any()
    assert seq.length - int(seq.valid[1].sum()) == 2  # row 1 is 2 prompt tokens shorter


@pytest.mark.parametrize("head", ["l1", "diffusion"])
def test_input_embeddings_match_hand_built_sequence(head):
    """Every real input embedding equals the hand-built one: exact zeros in the L1 slots;
    diffusion slots are NoisyActionProjector(scalar) (1 -> d -> d, exact GELU) of the noised
    targets and the timestep token is the sinusoidal embedding of t, after proprio; the
    proprio token is fc2(GELU(fc1(p))) with exact GELU."""
    model, vit, hf = _build(head)
    actions = _actions()
    inputs = _inputs(actions)
    torch.manual_seed(123)
    with torch.no_grad():
        seq = model(inputs).sequence
    torch.manual_seed(123)  # place() draws the noise, then the timesteps
    noise = torch.randn(2, CHUNK, ADIM)
    t = torch.randint(0, T_TRAIN, (2,))
    abar = _ref_alphas_cumprod().to(torch.float32)
    noisy = abar[t].sqrt()[:, None, None] * actions + (1 - abar[t]).sqrt()[:, None, None] * noise
    with torch.no_grad():
        for row in range(2):
            if head == "l1":
                slots, time = torch.zeros(K, D), None
            else:
                slots, time = _ref_noisy_slots(model.head, noisy[row]), _ref_time(t[row])
            expected = _ref_row_embeds(model, vit, hf, inputs, row, slots, time)
            got = seq.embeds[row][seq.valid[row]]
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
            if head == "l1":
                assert (seq.embeds[row][seq.roles[row] == int(TokenRole.ACTION)] == 0).all()


def test_mlp_resnet_layer_norm_eps_and_residual_order():
    """MLPResNet: LN1 -> fc1 -> ReLU -> 2 x [x + ReLU(Linear(LN(x)))] -> LN2 -> fc2, affine
    LayerNorms with eps 1e-5 (inputs of variance ~1e-6 make eps visible)."""
    torch.manual_seed(0)
    m = MLPResNet(12, 8, 3, num_blocks=2)
    _jitter(m, 0.5)
    for scale in (1.0, 1e-3):
        x = torch.randn(5, 12) * scale
        with torch.no_grad():
            torch.testing.assert_close(m(x), _ref_mlp_resnet(m, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("normalized", [False, True])
def test_l1_actions_and_loss_match_reference(attention, normalized):
    """L1: one pass with zero slots, final post-norm states read at slot j - 1 (the first
    from the "▁" token), grouped to (B, chunk, a * D), MLPResNet; predict_action unnormalises
    where(mask, 0.5 (y + 1)(high - low + 1e-8) + low, y); the loss is the mean |pred - target|
    with targets normalised as the training pipeline does. "causal" is OFT under stock
    transformers (the Llama's default mask)."""
    norms = {}
    if normalized:
        norms = dict(
            action_normalizer=ActionNormalizer(ACTION_STATS),
            proprio_normalizer=ActionNormalizer(PROPRIO_STATS, name="proprio", form="oft_eval"),
        )
    model, vit, hf = _build("l1", attention, **norms)
    raw = _actions() * 1.5  # some targets fall outside the statistics' range
    inputs = _inputs(raw)
    with torch.no_grad():
        got_actions = model.predict_action(inputs)
        got_loss = model(inputs).loss
        preds = []
        for row in range(2):
            embeds = _ref_row_embeds(model, vit, hf, inputs, row, torch.zeros(K, D))
            hidden = _ref_hidden(hf, embeds, bidirectional=attention == "bidirectional")
            preds.append(_ref_mlp_resnet(model.head.model, _ref_read(hidden, _slot_start(
                inputs, row))))
        pred = torch.stack(preds)  # normalised, [2, chunk, a]
    target = _ref_normalize_pipeline(raw, ACTION_STATS) if normalized else raw
    expected_actions = _ref_unnormalize(pred, ACTION_STATS) if normalized else pred
    torch.testing.assert_close(got_actions, expected_actions, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_loss, (pred - target).abs().mean(), atol=ATOL, rtol=0)


def test_timestep_embedding_by_hand():
    """The timestep token: [sin(t f), cos(t f)] (sin first), f_i = exp(-ln(10000) i /
    (half - 1)) (divisor half - 1, not half), width d, float32."""
    t = torch.arange(T_TRAIN)
    got = sinusoidal_embedding(t, D)
    assert got.dtype == torch.float32 and got.shape == (T_TRAIN, D)
    expected = torch.stack([_ref_time(k) for k in range(T_TRAIN)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_ddim_schedule_timesteps_and_step_by_hand():
    """The head's scheduler: squaredcos_cap_v2 alphas_cumprod over 50 steps, "leading"
    timesteps (arange(N) * (50 // N), reversed), and step() = DDIM with eta 0, x0 clipped to
    [-1, 1], alpha_prev = 1 past t = 0, epsilon prediction."""
    assert oft_head("diffusion", D, CHUNK, ADIM).num_inference_steps == 50  # eval default
    model, *_ = _build("diffusion")
    sched = model.head.scheduler
    assert sched.config.num_train_timesteps == T_TRAIN
    abar = _ref_alphas_cumprod()
    torch.testing.assert_close(sched.alphas_cumprod.double(), abar, atol=1e-6, rtol=0)
    for n in (1, 3, 7, 50):
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == _ref_leading_timesteps(n)
        clipped_any = False
        for t in sched.timesteps.tolist():
            x, eps = torch.randn(2, CHUNK, ADIM) * 2, torch.randn(2, CHUNK, ADIM)
            expected, clipped = _ref_ddim_step(eps, t, x, n, abar.to(torch.float32))
            clipped_any |= clipped
            got = sched.step(eps, t, x).prev_sample
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert clipped_any


def test_diffusion_training_loss_matches_reference():
    """Diffusion training: noise ~ N(0, 1) then t ~ U{0..49} per row (that draw order);
    noisy = sqrt(abar_t) a + sqrt(1 - abar_t) eps; the timestep token after proprio and before
    the prompt; noise predicted from the states at slot j - 1; loss = MSE(eps_hat, eps)."""
    model, vit, hf = _build("diffusion")
    actions = _actions()
    inputs = _inputs(actions)
    torch.manual_seed(7)
    with torch.no_grad():
        got = model(inputs).loss
    torch.manual_seed(7)
    noise = torch.randn(2, CHUNK, ADIM)
    t = torch.randint(0, T_TRAIN, (2,))
    assert t[0] != t[1]
    abar = _ref_alphas_cumprod().to(torch.float32)
    noisy = abar[t].sqrt()[:, None, None] * actions + (1 - abar[t]).sqrt()[:, None, None] * noise
    with torch.no_grad():
        eps_hat = []
        for row in range(2):
            embeds = _ref_row_embeds(model, vit, hf, inputs, row,
                                     _ref_noisy_slots(model.head, noisy[row]), _ref_time(t[row]))
            hidden = _ref_hidden(hf, embeds)
            read = _ref_read(hidden, _slot_start(inputs, row, with_time=True))
            eps_hat.append(_ref_mlp_resnet(model.head.noise_predictor["mlp_resnet"], read))
    expected = ((torch.stack(eps_hat) - noise) ** 2).mean()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_diffusion_prediction_follows_ddim_by_hand():
    """Prediction (OFT layout): x ~ N(0, 1) of shape (B, chunk, a); for each leading timestep
    of set_timesteps(3) = [32, 16, 0], the whole sequence is re-run with the timestep token
    and the projected x in the slots, eps read at slot j - 1, and x = DDIM step by hand;
    predict_action returns the last x unnormalised."""
    model, vit, hf = _build("diffusion", steps=3,
                            action_normalizer=ActionNormalizer(ACTION_STATS))
    assert model.head.layout == "oft"
    inputs = _inputs()
    x = torch.randn(2, CHUNK, ADIM)
    with torch.no_grad():
        got = model.predict_action(inputs, Sampling(noise=x))
    assert model.head.scheduler.timesteps.tolist() == [32, 16, 0]
    abar = _ref_alphas_cumprod().to(torch.float32)
    clipped_any = False
    with torch.no_grad():
        for t in _ref_leading_timesteps(3):
            eps = []
            for row in range(2):
                embeds = _ref_row_embeds(model, vit, hf, inputs, row,
                                         _ref_noisy_slots(model.head, x[row]), _ref_time(t))
                read = _ref_read(_ref_hidden(hf, embeds), _slot_start(inputs, row, True))
                eps.append(_ref_mlp_resnet(model.head.noise_predictor["mlp_resnet"], read))
            x, clipped = _ref_ddim_step(torch.stack(eps), t, x, 3, abar)
            clipped_any |= clipped
    assert clipped_any  # the clip is exercised
    torch.testing.assert_close(got, _ref_unnormalize(x, ACTION_STATS), atol=ATOL, rtol=0)


def test_film_language_vector_is_mean_of_non_slot_embeddings():
    """FiLM (OFTLanguageVector): the mean of the input embeddings of every non-slot text
    token, ``<s>``, every prompt column (padding included, with the batch's pad id) and
    ``</s>``; the encoder is conditioned on exactly that vector."""
    model, _, hf = _build("l1", film=True)
    inputs = _inputs()
    inputs.input_ids[1, 3:] = 5  # a pad id of the batch's choosing, not 0
    embed = hf.get_input_embeddings()
    with torch.no_grad():
        got = model.runner(inputs).language_vector()
        expected = torch.stack([
            embed(torch.cat([torch.tensor([BOS]), inputs.input_ids[row], torch.tensor([EOS])]))
            .mean(0) for row in range(2)
        ])
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)
        images = model.runner(inputs).image_tokens
        direct = model.projector(model.encoder(inputs.pixels, condition=expected))
    torch.testing.assert_close(images, direct, atol=1e-6, rtol=0)
    # the padded columns count: a different pad id moves row 1's vector, not row 0's
    other = _inputs()
    with torch.no_grad():
        moved = model.runner(other).language_vector()
    torch.testing.assert_close(moved[0], got[0])
    assert (moved[1] - got[1]).abs().max() > 1e-4


def test_proprio_normalisation_eval_form_vs_pipeline_form():
    """OFT evaluation normalises proprio as clip(where(mask, 2(p-low)/(high-low+1e-8)-1, p),
    -1, 1): masked-out dims clipped too, constant dims not zeroed. The training pipeline's
    form is where(mask, clip(...), p) with constant dims (min == max) zeroed."""
    stats = {"q01": [-1.0, 0.0, 0.0, 2.0], "q99": [1.0, 4.0, 2.0, 2.0],
             "min": [-2.0, -1.0, 0.0, 2.0], "max": [2.0, 5.0, 2.0, 2.0],
             "mask": [True, True, False, True]}
    p = torch.tensor([[0.5, 5.0, 3.0, 2.5],     # dim 2 masked out and > 1
                      [-3.0, 1.0, -7.0, 1.5],   # dim 2 masked out and < -1
                      [0.0, 2.0, 0.25, 2.0]])   # dim 3 constant (min == max)
    low, high = torch.tensor(stats["q01"]), torch.tensor(stats["q99"])
    mask = torch.tensor(stats["mask"])
    scaled = 2 * (p - low) / (high - low + 1e-8) - 1
    eval_ref = torch.where(mask, scaled, p).clamp(-1, 1)
    pipe_ref = torch.where(mask, scaled.clamp(-1, 1), p)
    pipe_ref = torch.where(torch.tensor([False, False, False, True]), 0.0, pipe_ref)
    eval_got = ActionNormalizer(stats, name="proprio", form="oft_eval").normalize(p)
    pipe_got = ActionNormalizer(stats, name="proprio").normalize(p)
    torch.testing.assert_close(eval_got, eval_ref, atol=0, rtol=0)
    torch.testing.assert_close(pipe_got, pipe_ref, atol=0, rtol=0)
    assert eval_got[0, 2] == 1.0 and pipe_got[0, 2] == 3.0
    assert eval_got[1, 2] == -1.0 and pipe_got[1, 2] == -7.0
    assert pipe_got[0, 3] == 0.0 and eval_got[0, 3] == 1.0  # constant dim: 0 vs clipped
    assert eval_got[2, 3] == -1.0 and pipe_got[2, 3] == 0.0  # p == low on a constant dim
