import re

import numpy as np
import pytest
import torch
from _tiny import IMAGE_TOKEN_ID, VOCAB_SIZE, tiny_encoder, tiny_tokenizer
from PIL import Image
from transformers import AutoTokenizer

from vlakit.actions import ActionTokenizer
from vlakit.decoders import llama
from vlakit.models import openvla, paligemma
from vlakit.processors import OpenVLAProcessor, PaliGemmaProcessor, word_tokenizer
from vlakit.projectors import LinearProjector, MLPProjector
from vlakit.vision import stack_views


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_openvla_prompt_format_padding_and_space_token(tokenizer):
    encoder = tiny_encoder("fused")
    space = tokenizer.convert_tokens_to_ids("▁")
    processor = OpenVLAProcessor(tokenizer, encoder.preprocess, append_token_id=space)
    images = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8)
    batch = processor(images, ["pick up the cup", "open drawer"])
    first = _ids(tokenizer, "In: What action should the robot take to pick up the cup?\nOut:")
    assert batch.input_ids[0].tolist() == first + [space]
    second = _ids(tokenizer, "In: What action should the robot take to open drawer?\nOut:")
    assert batch.input_ids[1, : len(second) + 1].tolist() == second + [space]
    assert batch.text_valid.sum(1).tolist() == [len(first) + 1, len(second) + 1]
    assert (batch.input_ids[1, len(second) + 1 :] == tokenizer.pad_token_id).all()
    # fused encoder: 6 channels (3 per tower), one view, the encoders' size
    assert batch.pixels.shape == (2, 1, 6, 28, 28)


def test_images_as_pil_numpy_and_tensor_agree(tokenizer):
    encoder = tiny_encoder("vit")
    processor = OpenVLAProcessor(tokenizer, encoder.preprocess)
    array = np.random.randint(0, 256, (28, 28, 3), dtype=np.uint8)
    from_pil = processor([Image.fromarray(array)], "pick up the cup").pixels
    from_tensor = processor(torch.from_numpy(array).permute(2, 0, 1)[None], "pick up the cup")
    torch.testing.assert_close(from_pil, from_tensor.pixels, atol=1e-6, rtol=0)


def test_paligemma_prompt_format_and_token_types(tokenizer):
    encoder = tiny_encoder("vit")
    processor = PaliGemmaProcessor(tokenizer, encoder.preprocess, IMAGE_TOKEN_ID,
                                   encoder.patches_per_image)
    batch = processor(torch.rand(1, 2, 3, 28, 28), "describe image", suffixes="a red cup")
    n_img = 2 * encoder.patches_per_image  # two views
    prefix = [IMAGE_TOKEN_ID] * n_img + [tokenizer.bos_token_id] + _ids(tokenizer, "describe image")
    suffix = _ids(tokenizer, "a red cup") + [tokenizer.eos_token_id]
    assert batch.input_ids[0].tolist() == prefix + suffix
    assert batch.token_type_ids[0].tolist() == [0] * len(prefix) + [1] * len(suffix)


def test_prompt_without_room_for_action_slots(tokenizer):
    processor = OpenVLAProcessor(tokenizer, tiny_encoder("vit").preprocess,
                                 num_action_tokens=7, max_length=20)
    with pytest.raises(ValueError, match="no room for the action slots"):
        processor(torch.rand(1, 3, 28, 28), "pick up the cup")


def test_bad_actions_and_proprio(tokenizer):
    processor = OpenVLAProcessor(tokenizer, tiny_encoder("vit").preprocess)
    image = torch.rand(1, 3, 28, 28)
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor(image, "open drawer", actions=[[[float("inf"), 0.0]]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor(image, "open drawer", proprio=[[float("nan"), 0.0]])
    with pytest.raises(ValueError, match="3 dims"):
        processor(image, "open drawer", actions=[0.0, 1.0])
    with pytest.raises(ValueError, match="per prompt, but got 2 images .* for 1 prompt$"):
        processor(torch.rand(2, 3, 28, 28), "open drawer")


def test_batch_elements_with_different_view_counts():
    with pytest.raises(ValueError, match="view"):
        stack_views([torch.rand(2, 3, 28, 28), torch.rand(1, 3, 28, 28)])


# -- from_model, word_tokenizer, messages ------------------------------------------------


def _tiny_openvla(vocab_size=VOCAB_SIZE):
    encoder = tiny_encoder("vit")
    decoder = llama(vocab_size=vocab_size, dim=64, num_layers=1, num_heads=4, mlp_dim=128)
    return openvla(encoder=encoder, projector=MLPProjector([encoder.dim, 64, 64]),
                   decoder=decoder, action_tokenizer=ActionTokenizer(vocab_end=300, action_dim=7),
                   chunk_size=2)


def test_openvla_from_model_takes_preprocessing_and_action_count(tokenizer):
    model = _tiny_openvla()
    processor = OpenVLAProcessor.from_model(tokenizer, model, max_length=64)
    assert processor.preprocess == model.encoder.preprocess
    assert processor.num_action_tokens == 2 * 7  # chunk 2 x 7 dims, read from the head
    # the default append token is the tokenizer's "▁" piece (OpenVLA's 29871 in Llama-2)
    assert processor.append_token_id == tokenizer.convert_tokens_to_ids("▁")
    images = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8)
    batch = processor(images, ["pick up the cup", "open drawer"])
    manual = OpenVLAProcessor(tokenizer, model.encoder.preprocess)(images, ["pick up the cup",
                                                                           "open drawer"])
    assert torch.equal(batch.input_ids, manual.input_ids)
    assert torch.equal(batch.pixels, manual.pixels)
    assert model.predict_action(batch).shape == (2, 2, 7)


def test_from_model_rejects_ids_outside_the_vocabulary(tokenizer):
    model = _tiny_openvla()
    with pytest.raises(ValueError, match=r"append_token_id=29871 is outside the decoder's "
                                         r"vocabulary: ids must lie in 0\.\.319"):
        OpenVLAProcessor.from_model(tokenizer, model, append_token_id=29871)
    model = paligemma(encoder=tiny_encoder("vit"), projector=LinearProjector(48, 64),
                      decoder=llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=1, num_heads=4,
                                    mlp_dim=128), image_token_id=IMAGE_TOKEN_ID)
    with pytest.raises(ValueError, match=r"pad_id=400 is outside"):
        PaliGemmaProcessor.from_model(tokenizer, model, pad_id=400)


def test_paligemma_from_model_takes_image_count_and_placeholder(tokenizer):
    encoder = tiny_encoder("vit")
    model = paligemma(encoder=encoder, projector=LinearProjector(48, 64),
                      decoder=llama(vocab_size=VOCAB_SIZE, dim=64, num_layers=1, num_heads=4,
                                    mlp_dim=128),
                      image_token_id=IMAGE_TOKEN_ID, bos_id=1, eos_id=2)
    processor = PaliGemmaProcessor.from_model(tokenizer, model)
    assert processor.num_image_tokens == encoder.patches_per_image
    assert processor.image_token_id == IMAGE_TOKEN_ID
    assert (processor.bos_id, processor.eos_id) == (1, 2)
    images = torch.rand(1, 2, 3, 28, 28)
    manual = PaliGemmaProcessor(tokenizer, encoder.preprocess, IMAGE_TOKEN_ID,
                                encoder.patches_per_image)
    got = processor(images, "describe image", suffixes="a red cup")
    want = manual(images, "describe image", suffixes="a red cup")
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.token_type_ids, want.token_type_ids)
    with pytest.raises(ValueError, match="PlaceholderInterleaver"):
        PaliGemmaProcessor.from_model(tokenizer, _tiny_openvla())


def test_word_tokenizer_is_local_and_round_trips(tmp_path):
    tok = word_tokenizer(["pick up the red block", "open the drawer"])
    assert tok("open the red drawer")["input_ids"] == [1, 9, 6, 7, 10, 2]
    assert tok("open the box", add_special_tokens=False)["input_ids"] == [9, 6, 3]  # <unk>
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("open the red drawer")["input_ids"] == [1, 9, 6, 7, 10, 2]
    # the empty "▁" piece comes last (OpenVLA's processor appends it)
    processor = OpenVLAProcessor(tok, tiny_encoder("vit").preprocess)
    assert processor.append_token_id == len(tok) - 1 == tok.convert_tokens_to_ids("▁")
    assert processor.prompt_ids("open the drawer")[-1] == processor.append_token_id


def test_a_tokenizer_without_the_appended_piece_is_refused(tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"<unk>": 0, "open": 1}, unk_token="<unk>")), unk_token="<unk>")
    with pytest.raises(ValueError, match=r"append_token_id='▁', but the tokenizer .* has no "
                                         r"such token.*append_token_id=None to append nothing"):
        OpenVLAProcessor(bare, tiny_encoder("vit").preprocess)
    assert OpenVLAProcessor(bare, tiny_encoder("vit").preprocess,
                            append_token_id=None).append_token_id is None


def test_lowercase_is_an_option(tokenizer):
    plain = OpenVLAProcessor(tokenizer, tiny_encoder("vit").preprocess)
    lower = OpenVLAProcessor(tokenizer, tiny_encoder("vit").preprocess, lowercase=True)
    assert lower.prompt_ids("Pick Up The Cup") == plain.prompt_ids("pick up the cup")
    assert plain.prompt_ids("Pick Up The Cup") != plain.prompt_ids("pick up the cup")
    assert lower.config()["lowercase"] is True


def test_length_message_says_what_was_expected_and_found(tokenizer):
    processor = OpenVLAProcessor(tokenizer, tiny_encoder("vit").preprocess,
                                 num_action_tokens=7, max_length=20)
    n = len(processor.prompt_ids("pick up the cup"))
    message = (f"prompt 0 is {n} tokens long; with <s> (1), action slots (7) and </s> (1) the "
               f"sequence would be {n + 9} tokens, over max_length=20")
    with pytest.raises(ValueError, match=re.escape(message)):
        processor(torch.rand(1, 3, 28, 28), "pick up the cup")
