"""LightVLA: OpenVLA-OFT with a parameter-free token pruner in front of the Llama.

The full-size LightVLA-7B on the meta device (the pruner adds no parameters), then a tiny
LightVLA-style model: it predicts action chunks for a batch of 3 robots with 2 camera
views each (rows keep different numbers of image tokens: the batch is padded, each row
gets what it gets alone), prints the kept ratio per robot, runs the same model on one
view with no other change, and writes a picture of the kept patches.

python examples/lightvla.py [--out kept_patches.png]
"""

import argparse

import torch

from vlakit import count_parameters
from vlakit.decoders import llama
from vlakit.models import lightvla, lightvla_7b, oft_head
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer
from vlakit.projectors import MLPProjector, ProprioProjector
from vlakit.pruners import LightVLAPruner
from vlakit.vision import vit
from vlakit.viz import plot_kept_patches


def scenes(batch: int, views: int, size: int = 56) -> torch.Tensor:
    """Images with a few coloured blocks on a grey table: ``[b, v, 3, h, w]`` uint8."""
    g = torch.Generator().manual_seed(0)
    images = torch.full((batch, views, 3, size, size), 110, dtype=torch.uint8)
    for b in range(batch):
        for v in range(views):
            for _ in range(3):
                y, x = torch.randint(0, size - 16, (2,), generator=g).tolist()
                colour = torch.randint(0, 256, (3, 1, 1), generator=g).to(torch.uint8)
                images[b, v, :, y:y + 14, x:x + 14] = colour
    return images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="kept_patches.png")
    args = parser.parse_args()

    full = lightvla_7b(device="meta")  # LIBERO: proprio 8, chunk 8 x 7, L1; any view count
    print(f"LightVLA-7B on the meta device: {count_parameters(full):,} parameters "
          f"(OpenVLA-OFT-7B's; {type(full.pruner).__name__} has none)")

    torch.manual_seed(0)
    instructions = ["pick up the red block", "open the drawer", "put the block in the box"]
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *instructions])
    model = lightvla(
        encoder=vit(img_size=56, patch_size=14, dim=48, depth=2, num_heads=4, mlp_dim=96),
        projector=MLPProjector([48, 256, 128]),
        decoder=llama(vocab_size=len(tokenizer), dim=128, num_layers=2, num_heads=4,
                      mlp_dim=256),
        head=oft_head("l1", 128, chunk_size=8, action_dim=7),
        proprio_projector=ProprioProjector(8, 128),
        pruner=LightVLAPruner(),
    ).eval()
    processor = OpenVLAProcessor.from_model(tokenizer, model)
    images = scenes(3, views=2)
    batch = processor(images, instructions, proprio=torch.rand(3, 8) * 2 - 1)
    actions = model.predict_action(batch)  # [3, 8, 7]
    kept = model.pruner.last_kept  # [3, 2 views x 16 patches]
    print(f"2 views: actions {tuple(actions.shape)}")
    for row, text in enumerate(instructions):
        k = int(kept[row].sum())
        print(f"  robot {row} ({text!r}): kept {k}/{kept.shape[1]} image tokens "
              f"({k / kept.shape[1]:.0%})")
    print(f"kept ratio over the batch: {kept.float().mean():.1%}")

    one = processor(images[:, :1], instructions, proprio=torch.rand(3, 8) * 2 - 1)
    print(f"1 view, same model: actions {tuple(model.predict_action(one).shape)}, kept "
          f"{model.pruner.last_kept.float().mean():.1%} of {model.pruner.last_kept.shape[1]}")

    fig = plot_kept_patches(images[0], kept[0], titles=["third-person", "wrist"])
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
