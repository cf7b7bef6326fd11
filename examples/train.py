"""The training recipe as a script: a thin caller of ``vlakit.recipe.train`` (the same as
``vlakit train``), with the example models built here.

    python examples/train.py --steps 200                          # one process
    torchrun --nproc_per_node=2 examples/train.py --strategy ddp  # DDP (gloo on CPU)
    torchrun --nproc_per_node=8 examples/train.py --strategy fsdp --bf16 --ac   # FSDP2

The model and task are ``train_tiny.py``'s (a tiny OpenVLA-OFT-style model on a synthetic,
learnable task; ``--head``: OFT's L1 regression head, or its flow-matching or diffusion
head), or ``--data FOLDER``: a LeRobot v3 dataset (every camera a view, the state as
proprio, its statistics for normalisation, the pad mask of chunks that run past an
episode's end) read with ``vlakit.data.LeRobotDataset`` and batched through the processor;
with ``--model pi0`` (``--data`` only) a tiny pi0 (PaliGemma-shaped prefix, an action
expert with flow matching, LeRobot's normalisation and prompt) and its ``Pi0Processor``;
``--lora``: OFT's LoRA recipe (``oft_lora``) or openpi's for pi0 (``pi0_lora``);
``--lightvla``: a LightVLA pruner, its training noise annealed. What the recipe does (DDP /
FSDP2, bf16, accumulation, schedule, checkpoints with exact resume, the loss curve, the
policy bundle) is ``vlakit.recipe``'s: see its documentation.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import INSTRUCTIONS, action_statistics, build_model, make_batch  # noqa: E402

from vlakit import VLA  # noqa: E402
from vlakit.actions import ActionNormalizer  # noqa: E402
from vlakit.core import BidirectionalMask  # noqa: E402
from vlakit.decoders import llama  # noqa: E402
from vlakit.distributed import oft_lora, pi0_lora  # noqa: E402
from vlakit.interleave import PrefixInterleaver  # noqa: E402
from vlakit.models import (  # noqa: E402
    oft_head,
    pi0,
    pi0_decoder,
    pi0_expert,
    pi0_preprocessing,
)
from vlakit.processors import OPENVLA_PROMPT, word_tokenizer  # noqa: E402
from vlakit.projectors import LinearProjector, ProprioProjector  # noqa: E402
from vlakit.pruners import LightVLAPruner  # noqa: E402
from vlakit.recipe import (  # noqa: E402
    RecipeError,
    add_arguments,
    loss_label,  # noqa: E402, F401  (the plot label: tests read it here)
    options_from,
    train,
)
from vlakit.vision import vit  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)  # the recipe's own options
    p.add_argument("--lightvla", action="store_true", help="a LightVLA pruner, noise annealed")
    p.add_argument("--head", choices=("l1", "flow", "diffusion"), default="l1",
                   help="OFT's action head: L1 regression, flow matching or diffusion")
    p.add_argument("--model", choices=("oft", "pi0"), default="oft",
                   help="a tiny OpenVLA-OFT-style model, or a tiny pi0 (needs --data)")
    p.add_argument("--lora", action="store_true",
                   help="LoRA: OFT's recipe (oft_lora) or openpi's for pi0 (pi0_lora)")
    p.add_argument("--data", default=None, help="a LeRobot v3 folder (default: the synthetic "
                   "task)")
    p.add_argument("--chunk", type=int, default=4, help="actions per chunk (with --data)")
    return p.parse_args()


def build_dataset_model(vocab_size: int, dataset, head: str = "l1") -> VLA:
    """A tiny OFT-style model for a LeRobot dataset: its cameras as views (resized to 32 px
    by the processor), its state as the proprio token, its action width and chunk, its
    statistics for (un)normalisation; ``head`` one of OFT's (``"l1"``, ``"flow"``,
    ``"diffusion"``)."""
    stats = dataset.statistics()
    d = 64
    return VLA(
        encoder=vit(img_size=32, patch_size=8, dim=64, depth=2, num_heads=4, mlp_dim=128),
        projector=LinearProjector(64, d),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=vocab_size, dim=d, num_layers=2, num_heads=4, mlp_dim=128),
        mask_policy=BidirectionalMask(),
        head=oft_head(head, d, chunk_size=dataset.chunk_size, action_dim=dataset.action_dim),
        proprio_projector=ProprioProjector(dataset.state_dim, d),
        action_normalizer=ActionNormalizer.from_stats(stats),
        proprio_normalizer=ActionNormalizer.from_stats(stats, key="proprio"),
        num_views=len(dataset.cameras),
    )


def build_pi0_model(vocab_size: int, dataset) -> VLA:
    """A tiny pi0 for a LeRobot dataset: a SigLIP-shaped ViT with LeRobot's letterbox, a
    Gemma-shaped prefix (its last layer keys and values only), an action expert of the same
    depth and attention geometry, actions and state zero-padded to ``max(8, widths)``,
    LeRobot's mean/std normalisation; the placeholder id one past the vocabulary."""
    stats = next(iter(dataset.statistics().values()))
    width = max(8, dataset.action_dim, dataset.state_dim)
    return pi0(
        encoder=vit(img_size=32, patch_size=8, dim=64, depth=2, num_heads=4, mlp_dim=128,
                    gelu_approximate="tanh", preprocessing=pi0_preprocessing(32)),
        projector=LinearProjector(64, 64, bias=True),
        decoder=pi0_decoder(vocab_size=vocab_size, dim=64, num_layers=2, num_heads=4,
                            num_kv_heads=1, head_dim=16, mlp_dim=128),
        expert=pi0_expert(dim=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
                          mlp_dim=64),
        action_dim=dataset.action_dim, chunk_size=dataset.chunk_size, num_steps=10,
        max_dim=width, num_views=len(dataset.cameras), image_token_id=vocab_size,
        bos_id=1, eos_id=2,
        action_normalizer=ActionNormalizer(stats["action"], "normal", form="lerobot"),
        proprio_normalizer=ActionNormalizer(stats["proprio"], "normal", form="lerobot",
                                            name="proprio"),
    )


def main() -> None:
    args = parse()
    if args.model == "pi0" and not args.data:
        raise SystemExit("--model pi0 trains on a LeRobot folder: pass --data FOLDER")
    if args.model == "pi0" and args.head != "l1":
        raise SystemExit("--head picks OFT's head; pi0 has its own flow head: drop --head")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.data:
        from vlakit.data import LeRobotDataset

        data = LeRobotDataset(args.data, chunk_size=args.chunk)  # checks the folder first
        tokenizer = word_tokenizer([OPENVLA_PROMPT, *data.tasks.values()])
        if args.model == "pi0":
            model = build_pi0_model(len(tokenizer), data)
        else:
            model = build_dataset_model(len(tokenizer), data, args.head)
    else:
        stats = action_statistics(make_batch(2048, torch.Generator().manual_seed(1))["actions"])
        tokenizer = word_tokenizer([OPENVLA_PROMPT, *INSTRUCTIONS])
        model = build_model(len(tokenizer), stats, args.head)
        data = make_batch  # the synthetic task: a fresh batch every step
    if args.lightvla:
        model.add_pruner(LightVLAPruner())  # recorded: the saved policy keeps it
    if args.lora:  # recorded too: the saved policy holds the LoRA layers
        (pi0_lora if args.model == "pi0" else oft_lora)(model)
    try:
        train(model, data, tokenizer, options_from(args))
    except RecipeError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
