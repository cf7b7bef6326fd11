import pytest
import torch
from transformers import (
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)

from vlakit.core import IGNORE_ID, TokenRole
from vlakit.model import VLAInputs
from vlakit.models import paligemma_3b, paligemma_from_transformers

IMAGE_ID, BOS, EOS, PAD = 100, 2, 1, 0
NUM_IMAGE_TOKENS = 4  # 28 px / 14 px patches


def _tiny_hf():
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=14,
    )
    text = GemmaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD,
    )
    config = PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID, projection_dim=64,
    )
    config._attn_implementation = "eager"
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms so a wrong convention fails
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "vision" in name else 0.0))
    return model


def _rows(prompts, suffixes, left_pad=False):
    rows, types = [], []
    for prompt, suffix in zip(prompts, suffixes):
        prefix = [IMAGE_ID] * NUM_IMAGE_TOKENS + [BOS] + prompt
        rows.append(prefix + suffix)
        types.append([0] * len(prefix) + [1] * len(suffix))
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), PAD)
    tt = torch.zeros(len(rows), n, dtype=torch.long)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (r, t) in enumerate(zip(rows, types)):
        sl = slice(n - len(r), n) if left_pad else slice(0, len(r))
        ids[i, sl], tt[i, sl], valid[i, sl] = torch.tensor(r), torch.tensor(t), True
    return ids, tt, valid


def test_paligemma_3b_parameter_count_on_meta():
    model = paligemma_3b(device="meta")
    assert sum(p.numel() for p in model.parameters()) == 2_923_466_480
    assert sum(p.numel() for p in paligemma_3b(vocab_size=257152, device="meta").parameters()) \
        == 2_923_335_408


def test_paligemma_logits_match_transformers_with_prefix_suffix_and_padding():
    hf = _tiny_hf()
    ours = paligemma_from_transformers(hf).eval()
    ids, tt, valid = _rows([[10, 11, 12], [20, 21]], [[30, 31, 32, EOS], [40, EOS]])
    pixels = torch.randn(2, 3, 28, 28)
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0) + 1  # transformers' 1-indexed
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=valid.long(),
                      token_type_ids=tt, position_ids=positions).logits
        out = ours(VLAInputs(input_ids=ids, text_valid=valid, pixels=pixels[:, None],
                             token_type_ids=tt), return_logits=True)
    seq = out.sequence
    assert torch.equal(seq.valid, valid)
    assert (seq.roles[:, :NUM_IMAGE_TOKENS] == TokenRole.IMAGE).all()
    torch.testing.assert_close(out.logits[valid], expected[valid], atol=1e-4, rtol=0)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_paligemma_suffix_loss_matches_transformers_labels():
    hf = _tiny_hf()
    ours = paligemma_from_transformers(hf).eval()
    ids, tt, valid = _rows([[10, 11], [20, 21, 22]], [[30, 31, EOS], [40, EOS]])
    pixels = torch.randn(2, 3, 28, 28)
    labels = torch.where((tt == 1) & valid, ids, IGNORE_ID)
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0) + 1
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=valid.long(),
                      token_type_ids=tt, position_ids=positions, labels=labels).loss
        got = ours(VLAInputs(input_ids=ids, text_valid=valid, pixels=pixels[:, None],
                             token_type_ids=tt)).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_paligemma_greedy_generation_matches_transformers():
    hf = _tiny_hf()
    ours = paligemma_from_transformers(hf).eval()
    ids, tt, valid = _rows([[10, 11, 12], [20]], [[], []], left_pad=True)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=valid.long(),
                               token_type_ids=tt, max_new_tokens=5, do_sample=False)
        got = ours.generate(VLAInputs(input_ids=ids, text_valid=valid, pixels=pixels[:, None],
                                      token_type_ids=tt), max_new_tokens=5)
    assert torch.equal(got, expected[:, ids.shape[1]:])


def test_paligemma_placeholder_count_mismatch_is_an_error():
    ours = paligemma_from_transformers(_tiny_hf())
    ids, tt, valid = _rows([[10]], [[]])
    ids[0, 0] = 10  # one placeholder fewer than image tokens
    with pytest.raises(ValueError, match="3 image placeholder tokens.*4 image tokens"):
        ours(VLAInputs(input_ids=ids, text_valid=valid, pixels=torch.randn(1, 1, 3, 28, 28),
                       token_type_ids=tt))


def test_wrong_family_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        paligemma_from_transformers(LlamaForCausalLM(LlamaConfig(
            vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=2)))
