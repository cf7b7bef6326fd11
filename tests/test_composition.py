"""Every block available so far composes: encoder x projector x interleaver x decoder x head."""

import pytest
import torch
from _tiny import (
    ACTION_VOCAB_END,
    IMAGE_TOKEN_ID,
    tiny_decoder,
    tiny_encoder,
    tiny_tokenizer,
)

from vlakit import VLA
from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.core import CausalMask, PrefixLMMask
from vlakit.heads import DiscreteActionHead
from vlakit.interleave import PlaceholderInterleaver, PrefixInterleaver
from vlakit.processors import OpenVLAProcessor, PaliGemmaProcessor
from vlakit.projectors import LinearProjector, MLPProjector

ENCODERS = ["vit", "timm", "open_clip", "hf", "fused", "vit_two_views"]
ACTION_DIM, CHUNK = 2, 2
STATS = {"q01": [-1.0, 0.0], "q99": [1.0, 2.0], "mask": [True, False]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(encoder_name, projector_name, interleaver_name, decoder_name):
    encoder = tiny_encoder(encoder_name)
    decoder = tiny_decoder(decoder_name)
    if projector_name == "linear":
        projector = LinearProjector(encoder.dim, decoder.dim)
    else:
        projector = MLPProjector([encoder.dim, 2 * decoder.dim, decoder.dim])
    if interleaver_name == "prefix":
        interleaver, policy = PrefixInterleaver(bos_id=1, eos_id=2), CausalMask()
    else:
        interleaver = PlaceholderInterleaver(IMAGE_TOKEN_ID, bos_id=1, eos_id=2,
                                             position_offset=1)
        policy = PrefixLMMask()
    head = DiscreteActionHead(ActionTokenizer(vocab_end=ACTION_VOCAB_END, action_dim=ACTION_DIM),
                              chunk_size=CHUNK)
    return VLA(encoder, projector, interleaver, decoder, policy, head=head,
               action_normalizer=ActionNormalizer(STATS))


def _batch(model, interleaver_name, tokenizer, views, actions=None):
    images = torch.randint(0, 256, (2, views, 3, 32, 32), dtype=torch.uint8)
    if interleaver_name == "prefix":
        processor = OpenVLAProcessor(tokenizer, model.encoder.preprocess,
                                     append_token_id=tokenizer.convert_tokens_to_ids("▁"))
        return processor(images, ["pick up the cup", "open drawer"], actions=actions)
    processor = PaliGemmaProcessor(tokenizer, model.encoder.preprocess, IMAGE_TOKEN_ID,
                                   model.encoder.patches_per_image)
    return processor(images, ["pick up the cup", "open drawer"], actions=actions)


@pytest.mark.parametrize("decoder_name", ["own_llama", "hf"])
@pytest.mark.parametrize("interleaver_name", ["prefix", "placeholder"])
@pytest.mark.parametrize("projector_name", ["linear", "mlp"])
@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_compose_train_step_and_predict(
    encoder_name, projector_name, interleaver_name, decoder_name, tokenizer
):
    model = _model(encoder_name, projector_name, interleaver_name, decoder_name)
    views = 2 if encoder_name == "vit_two_views" else 1
    actions = torch.rand(2, CHUNK, ACTION_DIM) * 2 - 1
    batch = _batch(model, interleaver_name, tokenizer, views, actions=actions)

    out = model(batch)
    assert torch.isfinite(out.loss)
    n_image = views * model.encoder.patches_per_image
    assert int((out.sequence.roles == 2).sum(1)[0]) == n_image  # IMAGE role count
    out.loss.backward()
    for block in ("encoder", "projector", "decoder"):
        grads = [p.grad for p in getattr(model, block).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reached {block}"
    torch.optim.SGD(model.parameters(), lr=1e-3).step()

    model.eval()
    predicted = model.predict_action(_batch(model, interleaver_name, tokenizer, views))
    assert predicted.shape == (2, CHUNK, ACTION_DIM)
    assert torch.isfinite(predicted).all()
