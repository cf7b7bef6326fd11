import numpy as np
import pytest
import torch
from _tiny import IMAGE_TOKEN_ID, tiny_encoder, tiny_tokenizer
from PIL import Image

from vlakit.processors import OpenVLAProcessor, PaliGemmaProcessor
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
    with pytest.raises(ValueError, match="2 images .* for 1 prompts"):
        processor(torch.rand(2, 3, 28, 28), "open drawer")


def test_batch_elements_with_different_view_counts():
    with pytest.raises(ValueError, match="view"):
        stack_views([torch.rand(2, 3, 28, 28), torch.rand(1, 3, 28, 28)])
