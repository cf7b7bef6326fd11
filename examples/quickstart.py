"""vlakit quickstart: compose a tiny VLA from blocks, train one step, predict actions.

python examples/quickstart.py
"""

import torch
from _tokenizer import local_word_tokenizer

from vlakit import VLA, count_parameters
from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.core import CausalMask
from vlakit.decoders import llama
from vlakit.heads import DiscreteActionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.processors import OpenVLAProcessor
from vlakit.projectors import MLPProjector
from vlakit.vision import vit


def main() -> None:
    torch.manual_seed(0)
    # A VLA is constructors: eyes, a bridge, a language model, and a way to speak actions.
    model = VLA(
        encoder=vit(img_size=56, patch_size=14, dim=64, depth=2, num_heads=4, mlp_dim=128),
        projector=MLPProjector([64, 256, 128]),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=320, dim=128, num_layers=2, num_heads=4, hidden_dim=256),
        mask_policy=CausalMask(),
        head=DiscreteActionHead(ActionTokenizer(vocab_end=300, action_dim=7)),
        action_normalizer=ActionNormalizer(
            {"q01": [-0.05] * 6 + [0.0], "q99": [0.05] * 6 + [1.0], "mask": [True] * 6 + [False]}
        ),
    )
    print(
        f"built a tiny VLA: {count_parameters(model):,} parameters, "
        f"{model.encoder.patches_per_image} image tokens per view"
    )

    # What a robot loop has: camera images (any size, uint8), instructions, target actions.
    # The processor tokenizes OpenVLA's prompt, pads, and preprocesses the images.
    processor = OpenVLAProcessor(
        local_word_tokenizer(), model.encoder.preprocess, append_token_id=None
    )
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    instructions = ["pick up the red block", "open the drawer"]
    actions = torch.tensor(
        [[[0.01, -0.02, 0.0, 0.03, 0.0, -0.01, 1.0]], [[-0.04, 0.01, 0.02, 0.0, 0.05, 0.0, 0.0]]]
    )
    batch = processor(images, instructions, actions=actions)
    print(f"batch: prompt ids {tuple(batch.input_ids.shape)}, pixels {tuple(batch.pixels.shape)}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(batch).loss
    loss.backward()
    optimizer.step()
    print(f"one training step: loss {loss.item():.3f}")

    model.eval()
    predicted = model.predict_action(processor(images, instructions))
    print(f"predicted unnormalised actions {tuple(predicted.shape)}:")
    print(predicted.squeeze(1))


if __name__ == "__main__":
    main()
