"""Save and load any composition: the constructor tree as JSON, the weights as safetensors,
a Hub round trip against a local folder, and the errors for what cannot be described or
does not fit."""

import json
import shutil

import pytest
import torch

from vlakit import VLA, VLAInputs
from vlakit.actions import ActionNormalizer
from vlakit.core import (
    CheckpointError,
    CheckpointFiles,
    DescriptionError,
    ParallelDecodingMask,
    building,
    describe,
    load_into,
)
from vlakit.decoders import llama
from vlakit.heads import FlowMatchingHead, L1RegressionHead, Sampling
from vlakit.interleave import PrefixInterleaver
from vlakit.language import OFTLanguageVector
from vlakit.models import lightvla_7b, openvla_oft_7b
from vlakit.projectors import MLPProjector, ProprioProjector
from vlakit.pruners import TopKPruner
from vlakit.vision import FusedEncoder, vit


def _composition(head=None, proprio=5, film=True):
    torch.manual_seed(0)
    towers = [vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64,
                  class_token=True, reg_tokens=4, layer_scale_init=1e-5, output_layer=-2),
              vit(img_size=28, patch_size=14, dim=48, depth=2, num_heads=4, mlp_dim=96,
                  output_layer=-2, map_head=True)]
    encoder = FusedEncoder([t.truncate() for t in towers])
    if film:
        encoder.add_film(64)
    return VLA(
        encoder=encoder,
        projector=MLPProjector([80, 160, 64]),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=128),
        mask_policy=ParallelDecodingMask(),
        head=head or L1RegressionHead(64, action_dim=3, chunk_size=2),
        proprio_projector=ProprioProjector(proprio, 64),
        action_normalizer=ActionNormalizer({"q01": [-1.0, 0.0, -2.0], "q99": [1.0, 1.0, 2.0],
                                            "mask": [True, True, False]}),
        pruner=TopKPruner(0.5),
        language_vector=OFTLanguageVector(1, 2) if film else None,
    ).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return VLAInputs(input_ids=torch.randint(5, 200, (2, 4), generator=g),
                     text_valid=torch.ones(2, 4, dtype=torch.bool),
                     pixels=torch.randn(2, 1, 6, 28, 28, generator=g),
                     proprio=torch.randn(2, 5, generator=g))


def test_a_composition_round_trips_to_identical_outputs(tmp_path):
    model = _composition()
    with torch.no_grad():  # some non-trivial values in the zero-initialised blocks
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(tmp_path)
    description = json.loads((tmp_path / "vlakit.json").read_text())
    assert description["model"]["$class"] == "vlakit.model.VLA"
    assert {"encoder", "projector", "decoder", "head", "pruner", "proprio_projector"} <= set(
        description["model"]["args"])
    again, report = VLA.from_pretrained(tmp_path, return_report=True)
    assert report.loaded == len(model.state_dict()) and not report.cast
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(again.eval().predict_action(_batch()), model.predict_action(_batch()))
    assert type(again.pruner) is TopKPruner and type(again.language_vector) is OFTLanguageVector


def test_sampling_heads_and_schedulers_round_trip(tmp_path):
    from vlakit.heads import DiffusionActionHead

    for head in (FlowMatchingHead(64, 3, 2, num_steps=3),
                 DiffusionActionHead(64, 3, 2, num_inference_steps=3, layout="cached")):
        model = _composition(head=head, film=False)
        model.save_pretrained(tmp_path / type(head).__name__)
        again = VLA.from_pretrained(tmp_path / type(head).__name__).eval()
        want = model.predict_action(_batch(), Sampling(generator=torch.Generator().manual_seed(3)))
        got = again.predict_action(_batch(), Sampling(generator=torch.Generator().manual_seed(3)))
        assert torch.equal(got, want)


def test_full_size_builders_describe_and_rebuild_on_meta():
    from vlakit.core import rebuild

    for build in (lambda: openvla_oft_7b(device="meta", film=True),
                  lambda: lightvla_7b(device="meta", head="diffusion")):
        model = build()
        text = json.dumps(describe(model))
        with building(None, "meta"):
            again = rebuild(json.loads(text))
        assert {k: v.shape for k, v in again.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()}
        assert type(again.pruner) is type(model.pruner)


def test_another_compositions_weights_are_refused_with_a_full_report(tmp_path):
    _composition().save_pretrained(tmp_path / "a")
    other = _composition(proprio=7, film=False)
    with pytest.raises(CheckpointError) as error, CheckpointFiles(tmp_path / "a") as files:
        load_into(other, files)
    message = str(error.value)
    assert "unexpected" in message and "film.scale.weight" in message  # FiLM only in a
    assert "mis-shaped 1 (stored vs model): 'proprio_projector.fc1.weight (64, 5) vs " \
           "(64, 7)'" in message
    missing = _composition(film=False)
    missing.decoder.layers[0].mlp_norm.register_parameter("extra", torch.nn.Parameter(
        torch.ones(1)))
    with pytest.raises(CheckpointError, match="missing 1: 'decoder.layers.0.mlp_norm.extra'"), \
            CheckpointFiles(tmp_path / "a") as files:
        state = {k: files[k] for k in files if ".film." not in k}
        load_into(missing, state)


def test_the_hub_round_trip_against_a_local_folder(tmp_path, monkeypatch):
    import huggingface_hub

    hub = tmp_path / "hub"
    calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls.append(("create", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        calls.append(("upload", repo_id, commit_message))
        shutil.copytree(folder_path, hub / repo_id)
        return "commit"

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append(("download", repo_id, revision))
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = _composition()
    assert model.push_to_hub("me/tiny-vla", private=True) == "commit"
    again = VLA.from_pretrained("me/tiny-vla", revision="main")
    assert [c[0] for c in calls] == ["create", "upload", "download"]
    assert sorted(p.name for p in (hub / "me/tiny-vla").iterdir()) == ["model.safetensors",
                                                                      "vlakit.json"]
    assert torch.equal(again.eval().predict_action(_batch()), model.predict_action(_batch()))


def test_what_cannot_be_described_is_named_before_anything_is_written(tmp_path):
    import transformers

    from vlakit.decoders import HFDecoder

    model = _composition()
    model.pruner = TopKPruner(0.25)  # replaced after construction: not in the arguments
    with pytest.raises(DescriptionError, match="model.pruner was replaced after VLA was built"):
        model.save_pretrained(tmp_path / "replaced")
    assert not (tmp_path / "replaced").exists()
    lambda_score = _composition()
    lambda_score = VLA(**{**lambda_score.__dict__["_recorded_init"][1],
                          "pruner": TopKPruner(0.5, score=lambda t, s: t.norm(dim=-1))})
    with pytest.raises(DescriptionError, match="a lambda or a local function"):
        describe(lambda_score)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4))
    wrapped = VLA(**{**_composition().__dict__["_recorded_init"][1], "decoder": HFDecoder(hf)})
    with pytest.raises(DescriptionError, match="model.decoder is a vlakit.decoders.hf.HFDecoder"):
        describe(wrapped)
    with pytest.raises(CheckpointError, match="has no vlakit.json"):
        VLA.from_pretrained(tmp_path)


def test_lora_layers_built_by_a_factory_round_trip(tmp_path):
    from vlakit.core import LoRALinear, apply_lora, lora, merge_lora

    model = VLA(**{**_composition(film=False).__dict__["_recorded_init"][1],
                   "decoder": llama(vocab_size=256, dim=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, mlp_dim=128, linear=lora(4, alpha=8))})
    assert isinstance(model.decoder.layers[0].attn.q_proj, LoRALinear)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_()
    model.save_pretrained(tmp_path)
    again = VLA.from_pretrained(tmp_path).eval()
    assert torch.equal(again.predict_action(_batch()), model.eval().predict_action(_batch()))
    merged = merge_lora(again)
    assert len(merged) == 2 * 7 and not any(isinstance(m, LoRALinear) for m in again.modules())
    torch.testing.assert_close(again.predict_action(_batch()), model.predict_action(_batch()),
                               atol=1e-5, rtol=0)
    plain = _composition(film=False)
    names = apply_lora(plain.decoder, 4, targets=lambda name, layer: name.endswith("q_proj"))
    assert names == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]
    torch.testing.assert_close(plain.predict_action(_batch()),
                               _composition(film=False).predict_action(_batch()))


def test_a_description_is_data_never_code(tmp_path):
    from vlakit.core import rebuild

    for evil in ({"$class": "os.system", "args": {"command": "touch pwned"}},
                 {"$ref": "os.system"},
                 {"$from_config": "subprocess.Popen", "config": {"$dict": {}}},
                 {"$class": "vlakit.projectors.LinearProjector", "args": {"in_dim": 2,
                  "out_dim": 2}, "calls": [["__init__", {"in_dim": 3, "out_dim": 3}]]},
                 {"$class": "builtins.eval", "args": {}}):
        with pytest.raises(DescriptionError, match="not|only"):
            rebuild(evil)
    assert not (tmp_path / "pwned").exists()
    _composition().save_pretrained(tmp_path / "ok")
    text = (tmp_path / "ok" / "vlakit.json").read_text()
    (tmp_path / "ok" / "vlakit.json").write_text(
        text.replace('"vlakit.projectors.MLPProjector"', '"os.system"'))
    with pytest.raises(DescriptionError, match="'os.system', outside the trusted modules"):
        VLA.from_pretrained(tmp_path / "ok")


def test_a_saved_deep_copy_still_describes_itself(tmp_path):
    import copy

    model = copy.deepcopy(_composition())
    model.save_pretrained(tmp_path)
    assert torch.equal(VLA.from_pretrained(tmp_path).eval().predict_action(_batch()),
                       model.predict_action(_batch()))
