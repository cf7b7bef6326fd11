"""OpenVLA assembly vs the published algorithm, written out here from timm towers and a
transformers Llama on the same weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from transformers import LlamaConfig, LlamaForCausalLM

from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.batch import VLAInputs
from vlakit.convert import decoder_from_transformers, vit_from_timm
from vlakit.core import TokenRole
from vlakit.models import openvla, openvla_7b
from vlakit.projectors import MLPProjector
from vlakit.vision import FusedEncoder

BOS, EOS, VOCAB_END, ACTION_DIM = 1, 2, 320, 3
STATS = {"q01": [-0.5, 0.0, -2.0], "q99": [0.5, 1.0, 2.0], "mask": [True, True, False]}


def _towers():
    torch.manual_seed(0)
    dino = VisionTransformer(
        img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2,
        class_token=True, reg_tokens=4, no_embed_class=True, init_values=0.5,
        num_classes=0, dynamic_img_size=False,
    ).eval()
    siglip = VisionTransformer(
        img_size=28, patch_size=14, embed_dim=40, depth=3, num_heads=4, mlp_ratio=2,
        class_token=False, global_pool="map", num_classes=0,
    ).eval()
    return dino, siglip


def _llama():
    config = LlamaConfig(
        vocab_size=328, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def _build():
    dino, siglip = _towers()
    hf = _llama()
    encoder = FusedEncoder([vit_from_timm(dino, output_layer=-2),
                            vit_from_timm(siglip, output_layer=-2)])
    model = openvla(
        encoder=encoder,
        projector=MLPProjector([72, 288, 64, 64]),
        decoder=decoder_from_transformers(hf),
        action_tokenizer=ActionTokenizer(vocab_end=VOCAB_END, action_dim=ACTION_DIM),
        action_normalizer=ActionNormalizer(STATS),
    ).eval()
    return model, dino, siglip, hf


def _reference_patches(model, dino, siglip, pixels):
    """Published algorithm: both towers' second-to-last block, no final norm, prefix tokens
    dropped, concatenated on features, then fc1-GELU-fc2-GELU-fc3."""
    n_dino, n_siglip = len(dino.blocks) - 2, len(siglip.blocks) - 2
    f1 = dino.get_intermediate_layers(pixels[:, :3], n={n_dino})[0]
    f2 = siglip.get_intermediate_layers(pixels[:, 3:], n={n_siglip})[0]
    x = torch.cat([f1, f2], dim=-1)
    p = model.projector
    return p.fc3(F.gelu(p.fc2(F.gelu(p.fc1(x)))))


def _inputs():
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 0, 0]])
    valid = ids != 0
    pixels = torch.randn(2, 1, 6, 28, 28)
    return ids, valid, pixels


def test_openvla_7b_parameter_count_on_meta():
    model = openvla_7b(device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_541_237_184
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("encoder", "projector", "decoder")}
    assert parts == {"encoder": 303_230_976 + 427_680_704, "projector": 71_385_600,
                     "decoder": 6_738_939_904}


def test_openvla_logits_match_reference_computation():
    model, dino, siglip, hf = _build()
    ids, valid, pixels = _inputs()
    actions = torch.tensor([[[0.1, 0.5, 1.0]], [[-0.4, 0.9, -3.0]]])
    with torch.no_grad():
        out = model(VLAInputs(input_ids=ids, text_valid=valid, pixels=pixels, actions=actions),
                    return_logits=True)
        seq = out.sequence
        normalized = model.action_normalizer.normalize(actions)
        action_ids = model.head.tokenizer.encode(normalized)[:, 0]  # [b, a]
        embed = hf.get_input_embeddings()
        for row in range(2):
            n_text = int(valid[row].sum())
            patches = _reference_patches(model, dino, siglip, pixels[row : row + 1, 0])
            tokens = torch.cat([torch.tensor([BOS]), ids[row, :n_text], action_ids[row],
                                torch.tensor([EOS])])
            emb = embed(tokens[None])
            emb = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
            expected = hf(inputs_embeds=emb).logits[0]
            got = out.logits[row][seq.valid[row]]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            # the loss targets are the action tokens and </s>
            targets = seq.token_ids[row][seq.role_mask(TokenRole.ACTION, TokenRole.EOS)[row]]
            assert targets.tolist() == action_ids[row].tolist() + [EOS]
    assert torch.isfinite(out.loss)


def test_openvla_discrete_action_round_trip():
    model, dino, siglip, hf = _build()
    ids, valid, pixels = _inputs()
    with torch.no_grad():
        got = model.predict_action(VLAInputs(input_ids=ids, text_valid=valid, pixels=pixels))
    assert got.shape == (2, 1, ACTION_DIM)
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    q01, q99, mask = (np.array(STATS[k]) for k in ("q01", "q99", "mask"))
    embed = hf.get_input_embeddings()
    for row in range(2):
        n_text = int(valid[row].sum())
        with torch.no_grad():
            patches = _reference_patches(model, dino, siglip, pixels[row : row + 1, 0])
            emb = embed(torch.cat([torch.tensor([BOS]), ids[row, :n_text]])[None])
            emb = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
            generated = hf.generate(inputs_embeds=emb, max_new_tokens=ACTION_DIM,
                                    do_sample=False, pad_token_id=0)[0].numpy()
        normalized = centers[np.clip(VOCAB_END - generated - 1, 0, 254)]
        expected = np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)
        np.testing.assert_allclose(got[row, 0].numpy(), expected, atol=1e-6)


def test_openvla_predict_actions_for_any_batch_size_and_bad_actions():
    model, *_ = _build()
    ids, valid, pixels = _inputs()
    with pytest.raises(ValueError, match="chunk=1, action_dim=3"):
        model(VLAInputs(input_ids=ids, text_valid=valid, pixels=pixels,
                        actions=torch.zeros(2, 2, 3)))
    with pytest.raises(ValueError, match="NaN|non-finite|infinite"):
        model(VLAInputs(input_ids=ids, text_valid=valid, pixels=pixels,
                        actions=torch.full((2, 1, 3), float("nan"))))
    big = VLAInputs(input_ids=ids.repeat(3, 1), text_valid=valid.repeat(3, 1),
                    pixels=pixels.repeat(3, 1, 1, 1, 1))
    assert model.predict_action(big).shape == (6, 1, ACTION_DIM)
