"""OpenVLA-7B: the full-size model on the meta device, then the same recipe at tiny size.

python examples/openvla_7b.py
"""

import torch

from vlakit import parameter_table
from vlakit.actions import ActionNormalizer, ActionTokenizer
from vlakit.decoders import llama
from vlakit.models import openvla, openvla_7b
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer
from vlakit.projectors import MLPProjector
from vlakit.vision import FusedEncoder, vit


def main() -> None:
    print("OpenVLA-7B on the meta device:")
    print(parameter_table(openvla_7b(device="meta"), depth=3))  # towers, blocks

    # The same recipe at tiny size: fused DINOv2-style + SigLIP-style towers stopping at the
    # second-to-last block -> 3-layer MLP projector -> Llama, actions as 256-bin tokens.
    torch.manual_seed(0)
    dino = vit(
        img_size=56,
        patch_size=14,
        dim=32,
        depth=3,
        num_heads=4,
        mlp_dim=64,
        layer_scale_init=1e-5,
        class_token=True,
        reg_tokens=4,
        output_layer=-2,
    )
    siglip = vit(
        img_size=56, patch_size=14, dim=48, depth=3, num_heads=4, mlp_dim=96, output_layer=-2
    )
    stats = {
        "q01": [-0.03, -0.02, -0.03, -0.1, -0.1, -0.2, 0.0],
        "q99": [0.03, 0.02, 0.03, 0.1, 0.1, 0.2, 1.0],
        "mask": [True] * 6 + [False],
    }
    model = openvla(
        encoder=FusedEncoder([dino, siglip]),
        projector=MLPProjector([80, 320, 128, 128]),
        decoder=llama(vocab_size=320, dim=128, num_layers=2, num_heads=4, mlp_dim=256),
        action_tokenizer=ActionTokenizer(vocab_end=300, action_dim=7),
        action_normalizer=ActionNormalizer(stats),
    ).eval()
    # A real model's tokenizer: AutoTokenizer.from_pretrained(path). Here a tiny one that
    # knows only these words (built in memory; nothing is downloaded).
    instructions = ["pick up the red block", "open the drawer"]
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *instructions])
    # from_model: the encoder's preprocessing and the head's action token count
    processor = OpenVLAProcessor.from_model(tokenizer, model)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)  # two robots' cameras
    batch = processor(images, instructions)
    actions = model.predict_action(batch)
    print(
        f"\ntiny OpenVLA recipe: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"image tokens per view: {model.encoder.patches_per_image}"
    )
    print(f"predicted unnormalised actions {tuple(actions.shape)}:\n{actions.squeeze(1)}")


if __name__ == "__main__":
    main()
