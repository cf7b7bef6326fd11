"""Token ids are checked against the decoder's vocabulary: at build time and at run time."""

import pytest
import torch
from _tiny import VOCAB_SIZE, tiny_decoder

import vlakit
from vlakit import VLA, VLAInputs
from vlakit.actions import ActionTokenizer
from vlakit.core import CausalMask
from vlakit.core.checks import should_validate
from vlakit.heads import DiscreteActionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.projectors import LinearProjector
from vlakit.vision import vit


def _model(vocab_end=300, bos_id=1, eos_id=2, decoder="own_llama"):
    return VLA(
        vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, 64), PrefixInterleaver(bos_id=bos_id, eos_id=eos_id),
        tiny_decoder(decoder), CausalMask(),
        head=DiscreteActionHead(ActionTokenizer(vocab_end=vocab_end, action_dim=2)),
    )


@pytest.mark.parametrize("decoder", ["own_llama", "hf"])
def test_action_tokenizer_past_the_vocabulary_fails_when_the_model_is_built(decoder):
    with pytest.raises(ValueError, match=r"token ids 144\.\.399 .* vocabulary has 320 tokens"):
        _model(vocab_end=400, decoder=decoder)


@pytest.mark.parametrize("field", ["bos_id", "eos_id"])
def test_special_ids_past_the_vocabulary_fail_when_the_model_is_built(field):
    with pytest.raises(ValueError, match=rf"{field}=320 is outside .* 320 tokens"):
        _model(**{field: VOCAB_SIZE})


@pytest.mark.parametrize("decoder", ["own_llama", "own_gemma", "hf"])
def test_ids_reaching_the_embedding_name_the_largest_id_and_the_vocabulary(decoder):
    dec = tiny_decoder(decoder)
    ids = torch.tensor([[5, 400, 7], [1, 2, 3]])
    with pytest.raises(ValueError, match=r"token id 400 is outside .* 320 tokens .*0\.\.319"):
        dec.embed_tokens(ids)
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        dec.embed_tokens(torch.tensor([[-1, 3]]))


def test_prompt_ids_past_the_vocabulary_fail_in_the_model_with_a_clear_error():
    model = _model()
    inputs = VLAInputs(input_ids=torch.tensor([[5, 29871]]),
                       text_valid=torch.ones(1, 2, dtype=torch.bool),
                       pixels=torch.zeros(1, 1, 3, 28, 28))
    with pytest.raises(ValueError, match="token id 29871 is outside the decoder's vocabulary"):
        model.predict_action(inputs)


def test_validation_switch_keeps_cpu_checks_and_is_restored():
    cpu = torch.zeros(1)
    assert vlakit.validation_enabled() and should_validate(cpu)
    with vlakit.validation(False):
        assert not vlakit.validation_enabled()
        assert should_validate(cpu)  # reading a CPU tensor back costs nothing: always on
        assert not should_validate(torch.zeros(1, device="meta"))
    assert vlakit.validation_enabled()
    vlakit.set_validation(False)
    try:
        assert not vlakit.validation_enabled()
    finally:
        vlakit.set_validation(True)
