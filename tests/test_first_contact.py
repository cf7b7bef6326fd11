"""What a new user hit on a clean clone (a second first-contact pass), each pinned."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlakit.models import paligemma_3b
from vlakit.processors import (
    OPENVLA_PROMPT,
    OpenVLAProcessor,
    PaliGemmaProcessor,
    word_tokenizer,
)
from vlakit.vision import PreprocessConfig, preprocess_images

CONFIG = PreprocessConfig(size=28, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_word_tokenizer_splits_punctuation_and_ignores_template_fields():
    tok = word_tokenizer([OPENVLA_PROMPT, "pick up the red block"])
    prompt = OPENVLA_PROMPT.format(instruction="pick up the red block")
    pieces = tok.convert_ids_to_tokens(tok(prompt, add_special_tokens=False)["input_ids"])
    assert "<unk>" not in pieces and pieces[-4:] == ["block", "?", "Out", ":"]
    assert "{" not in tok.get_vocab() and "instruction" not in tok.get_vocab()


def test_paligemma_processor_accepts_a_placeholder_outside_the_vocabulary():
    model = paligemma_3b(vocab_size=257152, device="meta")  # pi0's PaliGemma
    processor = PaliGemmaProcessor.from_model(word_tokenizer(["caption en"]), model)
    assert processor.image_token_id == 257152 and processor.num_image_tokens == 256


def test_several_views_as_nested_lists_of_pil_images():
    rng = np.random.default_rng(0)
    pils = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(4)]
    out = preprocess_images([[pils[0], pils[1]], [pils[2], pils[3]]], CONFIG)
    assert out.shape == (2, 2, 3, 28, 28)
    assert torch.equal(out[1, 0], preprocess_images(pils[2], CONFIG)[0])
    with pytest.raises(ValueError, match="same number of views"):
        preprocess_images([[pils[0], pils[1]], [pils[2]]], CONFIG)
    image = torch.rand(1, 3, 28, 28)  # a batch, not one view
    with pytest.raises(ValueError, match="each view must be one image"):
        preprocess_images([[image], [image]], CONFIG)


def test_channels_last_tensors_get_a_hint():
    with pytest.raises(ValueError, match=r"looks channels-last.*permute\(0, 3, 1, 2\)"):
        preprocess_images(torch.rand(2, 32, 32, 3), CONFIG)


def test_an_empty_batch_says_so():
    tok = word_tokenizer([OPENVLA_PROMPT])
    processor = OpenVLAProcessor(tok, lambda images: preprocess_images(images, CONFIG))
    with pytest.raises(ValueError, match="got no prompts"):
        processor(torch.zeros(0, 3, 28, 28, dtype=torch.uint8), [])


@pytest.mark.parametrize("name", ["timm", "open_clip", "hf"])
def test_wrapped_encoders_built_on_meta_are_fully_initialised(name):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny import tiny_encoder

    from vlakit.core import init_parameters

    with torch.device("meta"):
        encoder = tiny_encoder(name)
    encoder.to_empty(device="cpu")
    for tensor in [*encoder.parameters(), *encoder.buffers()]:
        if tensor.is_floating_point():
            tensor.data.fill_(float("nan"))
        else:
            tensor.data.fill_(-7)
    init_parameters(encoder)
    bad = [n for n, p in encoder.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, bad
    out = encoder(torch.rand(1, 3, 28, 28) * 2 - 1)
    assert torch.isfinite(out).all()
    for n, b in encoder.named_buffers():
        if n.endswith("position_ids"):
            assert torch.equal(b[0], torch.arange(b.shape[-1])), n
