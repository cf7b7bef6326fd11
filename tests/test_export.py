"""Export back: vlakit -> transformers -> vlakit round trips are exact (PaliGemma, Llama and
Gemma decoders), transformers' save_pretrained output loads back, and an OpenVLA assembly
saved in the published layout loads back to the same weights and logits."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_load_openvla import written  # noqa: E402, F401  (the module-scoped fixture)
from test_loading import _logits  # noqa: E402
from test_paligemma import _tiny_hf  # noqa: E402

from vlakit.convert import (  # noqa: E402
    decoder_from_transformers,
    decoder_to_transformers,
    openvla_state_dict,
    paligemma_to_transformers,
    save_openvla,
)
from vlakit.model import VLAInputs  # noqa: E402
from vlakit.models import load_openvla, load_paligemma, paligemma_from_transformers  # noqa: E402


def _same(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_paligemma_round_trips_through_transformers_exactly(tmp_path):
    hf = _tiny_hf()
    ours = paligemma_from_transformers(hf).eval()
    exported = paligemma_to_transformers(ours)
    _same(exported.state_dict(), hf.state_dict())
    assert exported.config.image_token_id == hf.config.image_token_id
    torch.testing.assert_close(_logits(None, exported), _logits(ours), atol=1e-5, rtol=0)
    _same(paligemma_from_transformers(exported).state_dict(), ours.state_dict())
    exported.save_pretrained(tmp_path)  # transformers' own format
    _same(load_paligemma(tmp_path).state_dict(), ours.state_dict())


def test_llama_and_gemma_decoders_round_trip_exactly():
    import transformers

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0))
    gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16))
    for hf in (llama, gemma):
        own = decoder_from_transformers(hf)
        back = decoder_to_transformers(own)
        assert type(back) is type(hf)
        _same(back.state_dict(), hf.state_dict())
        assert back.config.rms_norm_eps == hf.config.rms_norm_eps
        ids = torch.randint(0, 128, (1, 6))
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_openvla_saved_in_the_published_layout_loads_back(written, tmp_path):  # noqa: F811
    directory, _, state = written
    model = load_openvla(directory)
    exported = openvla_state_dict(model)
    # the published names: Prismatic's LayerScale, the language model's transformers keys
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in exported
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in exported
    assert set(exported) <= set(state)  # the unused tower parts were dropped on load
    config = json.loads((directory / "config.json").read_text())
    save_openvla(model, tmp_path, config, max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    (tmp_path / "dataset_statistics.json").write_text(
        (directory / "dataset_statistics.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(
        (directory / "preprocessor_config.json").read_text())
    again = load_openvla(tmp_path)
    _same(again.state_dict(), model.state_dict())
    ids = torch.tensor([[10, 11, 12]])
    batch = VLAInputs(input_ids=ids, text_valid=ids > 0, pixels=torch.randn(1, 1, 6, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(batch, return_logits=True).logits,
                                   model.eval()(batch, return_logits=True).logits)
