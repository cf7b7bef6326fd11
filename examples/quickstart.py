"""vlakit quickstart: compose a tiny VLA from blocks, overfit one batch, predict its actions.

python examples/quickstart.py

A randomly initialised model predicts meaningless actions, so this script first trains the
tiny model on one small batch until it has memorised it (the loss goes down), then asks it
for the actions of the same images and instructions and prints them beside the targets.
"""

import torch

from vlakit import VLA, count_parameters
from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.core import CausalMask
from vlakit.decoders import llama
from vlakit.heads import DiscreteActionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer
from vlakit.projectors import MLPProjector
from vlakit.vision import vit

STEPS = 40


def main() -> None:
    torch.manual_seed(0)
    # A VLA is constructors: eyes, a bridge, a language model, and a way to speak actions.
    model = VLA(
        encoder=vit(img_size=56, patch_size=14, dim=64, depth=2, num_heads=4, mlp_dim=128),
        projector=MLPProjector([64, 256, 128]),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=320, dim=128, num_layers=2, num_heads=4, mlp_dim=256),
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
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    instructions = ["pick up the red block", "open the drawer"]
    actions = torch.tensor(
        [[[0.01, -0.02, 0.0, 0.03, 0.0, -0.01, 1.0]], [[-0.04, 0.01, 0.02, 0.0, 0.05, 0.0, 0.0]]]
    )
    # A real model's tokenizer: AutoTokenizer.from_pretrained(path). Here a tiny one that
    # knows only these words, built in memory (nothing is downloaded).
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *instructions])
    # The processor tokenizes OpenVLA's prompt, pads, and preprocesses the images the way
    # the model's encoder expects (from_model reads that, and the action token count).
    processor = OpenVLAProcessor.from_model(tokenizer, model)
    batch = processor(images, instructions, actions=actions)
    print(f"batch: prompt ids {tuple(batch.input_ids.shape)}, pixels {tuple(batch.pixels.shape)}")

    # Overfit this one batch: a check that the whole path learns, not a training recipe.
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(1, STEPS + 1):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:>3}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        predicted = model.predict_action(processor(images, instructions))
    print(f"predicted unnormalised actions {tuple(predicted.shape)} vs targets:")
    for i, text in enumerate(instructions):
        print(f"  {text!r}")
        print(f"    predicted {[round(v, 4) for v in predicted[i, 0].tolist()]}")
        print(f"    target    {[round(v, 4) for v in actions[i, 0].tolist()]}")
    error = (predicted - actions).abs().max().item()
    # 256 bins over [-1, 1] after normalisation: 0.0004 wide for the arm (q01..q99 = 0.1),
    # 0.0078 for the gripper (not normalised); a memorised action lies within half a bin.
    print(f"largest difference: {error:.4f}")


if __name__ == "__main__":
    main()
