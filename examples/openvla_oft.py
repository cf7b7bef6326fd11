"""OpenVLA-OFT: the full-size LIBERO model on the meta device (per-block table and exact
total), then a tiny OFT with each continuous head predicting an action chunk for 3 robots.

python examples/openvla_oft.py
"""

import torch

from vlakit import parameter_table
from vlakit.actions import ActionNormalizer
from vlakit.decoders import llama
from vlakit.models import oft_head, openvla_oft, openvla_oft_7b
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer
from vlakit.projectors import MLPProjector, ProprioProjector
from vlakit.vision import FusedEncoder, vit


def main() -> None:
    # LIBERO: 2 views (third-person + wrist), proprio 8, chunk 8 x action 7, L1 head.
    full = openvla_oft_7b(device="meta")
    print("OpenVLA-OFT-7B (LIBERO: 2 views, proprio 8, chunk 8, L1 head) on the meta device:")
    print(parameter_table(full, depth=2))

    # The same recipe at tiny size, once per head. Action and proprio statistics as in a
    # dataset_statistics.json (q01/q99 bounds; the gripper dimension is not normalised).
    stats = {
        "action": {"q01": [-0.9] * 6 + [0.0], "q99": [0.9] * 6 + [1.0],
                   "mask": [True] * 6 + [False]},
        "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8},
    }
    instructions = ["pick up the red block", "open the drawer", "put the block in the box"]
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *instructions])
    images = torch.randint(0, 256, (3, 2, 3, 64, 64), dtype=torch.uint8)  # [b, views, c, h, w]
    proprio = torch.rand(3, 8) * 2 - 1  # [b, 8] robot state
    for head, attention in [("l1", "bidirectional"), ("diffusion", "bidirectional"),
                            ("diffusion", "parallel"), ("flow", "parallel")]:
        torch.manual_seed(0)
        dino = vit(img_size=56, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64,
                   layer_scale_init=1e-5, class_token=True, reg_tokens=4, output_layer=-2)
        siglip = vit(img_size=56, patch_size=14, dim=48, depth=2, num_heads=4, mlp_dim=96,
                     output_layer=-2)
        model = openvla_oft(
            encoder=FusedEncoder([dino, siglip]),
            projector=MLPProjector([80, 320, 128, 128]),
            decoder=llama(vocab_size=len(tokenizer), dim=128, num_layers=2, num_heads=4,
                          mlp_dim=256),
            head=oft_head(head, 128, chunk_size=8, action_dim=7, attention=attention,
                          num_inference_steps=10),
            proprio_projector=ProprioProjector(8, 128),
            attention=attention,
            action_normalizer=ActionNormalizer(stats["action"]),
            proprio_normalizer=ActionNormalizer(stats["proprio"], name="proprio",
                                                form="oft_eval"),
            num_views=2,
        ).eval()
        processor = OpenVLAProcessor.from_model(tokenizer, model)
        batch = processor(images, instructions, proprio=proprio)
        actions = model.predict_action(batch)  # [3, 8, 7], unnormalised
        layout = getattr(model.head, "layout", "one pass")
        print(f"{type(model.head).__name__:<20} attention={attention:<13} layout={layout:<8} "
              f"actions {tuple(actions.shape)}, first step of robot 0: "
              f"{[round(v, 3) for v in actions[0, 0].tolist()]}")


if __name__ == "__main__":
    main()
