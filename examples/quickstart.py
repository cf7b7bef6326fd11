"""vlakit quickstart: compose a tiny VLA from blocks, train one step, predict actions.

python examples/quickstart.py
"""

import torch

from vlakit import VLA, VLAInputs, count_parameters
from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.core import CausalMask
from vlakit.decoders import llama
from vlakit.heads import DiscreteActionHead
from vlakit.interleave import PrefixInterleaver
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

    # Two robot observations: camera images (any size, uint8), prompt ids, target actions.
    images = torch.randint(0, 256, (2, 1, 3, 64, 64), dtype=torch.uint8)
    prompt = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]])  # right-padded
    actions = torch.tensor(
        [[[0.01, -0.02, 0.0, 0.03, 0.0, -0.01, 1.0]], [[-0.04, 0.01, 0.02, 0.0, 0.05, 0.0, 0.0]]]
    )
    batch = VLAInputs(
        input_ids=prompt,
        text_valid=prompt != 0,
        pixels=model.encoder.preprocess(images),
        actions=actions,
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(batch).loss
    loss.backward()
    optimizer.step()
    print(f"one training step: loss {loss.item():.3f}")

    model.eval()
    predicted = model.predict_action(batch)
    print(f"predicted unnormalised actions {tuple(predicted.shape)}:")
    print(predicted.squeeze(1))


if __name__ == "__main__":
    main()
