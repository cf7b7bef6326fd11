"""Mistakes a new user made that used to pass without a word (issue "nothing silent"): each
now raises an error naming the value and saying what to do, or does the right thing."""

import dataclasses
import os
import stat

import pytest
import torch
from test_continuous_heads import _inputs, _model

from vlakit import VLA, VLAInputs
from vlakit.core import CausalMask, DescriptionError
from vlakit.decoders import HFDecoder, llama
from vlakit.heads import L1RegressionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.projectors import LinearProjector
from vlakit.pruners import LightVLAPruner, TopKPruner
from vlakit.vision import TimmEncoder, vit


def test_a_proprio_projector_without_proprio_raises_naming_its_width():
    model = _model("l1")
    no_state = dataclasses.replace(_inputs(actions=False), proprio=None)
    with pytest.raises(ValueError, match=r"proprio projector \(ProprioProjector, 5 inputs\) but "
                                         r"inputs.proprio is None: pass the robot state "
                                         r"\[batch, 5\]"):
        model.predict_action(no_state)
    with pytest.raises(ValueError, match="inputs.proprio is None"):
        model.train()(dataclasses.replace(_inputs(), proprio=None))


def test_prediction_runs_eval_behaviour_even_in_training_mode():
    model = _model("l1")
    model.add_pruner(LightVLAPruner(noise_scale=1.0))  # training adds noise to the scores
    inputs = _inputs(actions=False)
    evaluated = model.eval().predict_action(inputs)
    model.train()
    model.encoder.eval()  # a block a training loop keeps frozen in eval
    torch.testing.assert_close(model.predict_action(inputs), evaluated)
    assert model.training and model.pruner.training and not model.encoder.training
    assert model.head.training  # every module's own mode is put back


def _with_statistics(model):
    from vlakit.actions import ActionNormalizer

    # set by assignment: these tests never save the model
    model.action_normalizer = ActionNormalizer({"q01": [-2.0, 0.0, -0.5],
                                                "q99": [2.0, 4.0, 0.5]})
    return model


def test_normalised_actions_without_the_clip_trap():
    model = _with_statistics(_model("l1"))
    inputs = _inputs(actions=False)
    raw = model.predict_action(inputs)
    normalised = model.predict_action(inputs, unnormalize=False)
    torch.testing.assert_close(model.action_normalizer.unnormalize(normalised), raw)
    assert not torch.allclose(normalised, raw)


def test_already_normalised_actions_are_an_explicit_option():
    model = _with_statistics(_model("l1")).train()
    inputs = _inputs()
    normalised = model.action_normalizer.normalize(inputs.actions)
    as_raw = model(inputs).loss
    declared = dataclasses.replace(inputs, actions=normalised, actions_normalized=True)
    torch.testing.assert_close(model(declared).loss, as_raw)
    # ... and values that cannot be normalised are refused rather than trained on
    with pytest.raises(ValueError, match=r"actions_normalized is True but inputs.actions reach "
                                         r"3, outside the normalised \[-1, 1\]"):
        model(dataclasses.replace(inputs, actions=inputs.actions * 0 + 3.0,
                                  actions_normalized=True))
    assert declared.to("cpu").actions_normalized and declared.rows([0, 2]).actions_normalized


def test_a_pruner_added_to_a_trained_model_keeps_everything_and_saves(tmp_path):
    model = _model("l1")
    norm, views = model.action_normalizer, model.num_views
    inputs = _inputs(actions=False)
    before = model.predict_action(inputs)
    model.add_pruner(TopKPruner(keep=2))
    assert model.action_normalizer is norm and model.num_views == views
    pruned = model.predict_action(inputs)
    assert not torch.allclose(pruned, before)
    model.save_pretrained(tmp_path)
    again = VLA.from_pretrained(tmp_path)
    assert isinstance(again.pruner, TopKPruner) and again.num_views == views
    torch.testing.assert_close(again.predict_action(inputs), pruned, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="already has a pruner"):
        model.add_pruner(TopKPruner(keep=1))
    fresh = _model("l1")
    with pytest.raises(ValueError, match="layer=9, but the decoder has"):
        fresh.add_pruner(TopKPruner(keep=2, layer=9))
    assert isinstance(fresh.pruner, torch.nn.Identity)  # left as it was
    fresh.pruner = TopKPruner(keep=2)  # plain assignment cannot be saved
    with pytest.raises(DescriptionError, match="replace_module"):
        fresh.save_pretrained(tmp_path / "assigned")


def _timm_model(encoder):
    return VLA(encoder, LinearProjector(encoder.dim, 64), PrefixInterleaver(1, 2),
               llama(vocab_size=320, dim=64, num_layers=1, num_heads=4, num_kv_heads=2,
                     mlp_dim=128),
               CausalMask(), head=L1RegressionHead(64, 3, 2)).eval()


def test_a_timm_encoder_built_by_name_saves_and_loads_back(tmp_path):
    torch.manual_seed(0)
    encoder = TimmEncoder("vit_tiny_patch16_224", img_size=32, depth=1)
    encoder.add_film(64)
    model = _timm_model(encoder)
    model.save_pretrained(tmp_path)
    again = VLA.from_pretrained(tmp_path)
    assert isinstance(again.encoder, TimmEncoder) and again.encoder.has_film
    inputs = VLAInputs(input_ids=torch.randint(5, 200, (2, 4)),
                       text_valid=torch.ones(2, 4, dtype=torch.bool),
                       pixels=torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(again.predict_action(inputs), model.predict_action(inputs),
                               atol=1e-6, rtol=1e-6)


def test_a_timm_encoder_around_an_instance_says_how_to_save(tmp_path):
    import timm

    model = _timm_model(TimmEncoder(timm.create_model("vit_tiny_patch16_224", img_size=32,
                                                      depth=1)))
    with pytest.raises(DescriptionError, match=r"build it from the timm model name"):
        model.save_pretrained(tmp_path)


def test_saved_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _model("l1").save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for file in tmp_path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_a_mistyped_local_path_says_the_directory_does_not_exist(tmp_path):
    from vlakit.core import CheckpointError

    with pytest.raises(CheckpointError, match="no-such-run is not a directory"):
        VLA.from_pretrained(tmp_path / "no-such-run")


def test_a_sequence_past_the_decoders_positions_names_both_lengths():
    torch.manual_seed(0)
    decoder = llama(vocab_size=320, dim=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=128, max_seq_len=8)
    model = VLA(vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
                LinearProjector(32, 64), PrefixInterleaver(1, 2), decoder, CausalMask(),
                head=L1RegressionHead(64, 3, 2)).eval()
    inputs = VLAInputs(input_ids=torch.randint(5, 200, (1, 3)),
                       text_valid=torch.ones(1, 3, dtype=torch.bool),
                       pixels=torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"the sequence is 15 tokens \(prompt up to 3 tokens, "
                                         r"4 image tokens .* max_seq_len=8"):
        model.predict_action(inputs)


def test_a_transformers_decoder_refuses_positions_past_its_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8)
    decoder = HFDecoder(LlamaForCausalLM(config))
    assert decoder.max_seq_len == 8
    model = VLA(vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
                LinearProjector(32, 64), PrefixInterleaver(1, 2), decoder, CausalMask()).eval()
    inputs = VLAInputs(input_ids=torch.randint(5, 200, (1, 6)),
                       text_valid=torch.ones(1, 6, dtype=torch.bool),
                       pixels=torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"is 11 tokens .* HFDecoder takes positions below "
                                         r"max_seq_len=8"):
        model(inputs)
