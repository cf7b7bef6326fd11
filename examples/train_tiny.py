"""Train a tiny OpenVLA-OFT-style model on a synthetic task it can learn, on a CPU.

python examples/train_tiny.py [--steps 800] [--out train_tiny_loss.png] [--seed 0]

The task: each image shows one coloured square somewhere on a noisy background. The robot's
hand starts at a random point (given to the model as proprioception) and the instruction is
one of three:

- "reach the square": move onto the square in a chunk of 4 steps that slows down as it
  arrives (40%, 30%, 20%, 10% of the way), gripper open;
- "grasp the square": the same moves, and the gripper closes on the last two steps;
- "avoid the square": the mirror image, moving away from the square, gripper open.

So the target action chunk ``[4 steps, (dx, dy, gripper)]`` is a known function of the
image (where the square is), the instruction (which task) and the proprio (where the hand
is): a model that ignores any one of them cannot fit it. The model is OpenVLA-OFT's layout
at toy size: a ViT, a linear projector, a Llama decoder attending bidirectionally, one
proprio token, and an L1 regression head that reads the whole chunk from one parallel pass.

Training batches are generated on the fly from a seeded generator; a separate, differently
seeded validation set is held out. At the end the script prints the held-out mean absolute
error next to a threshold and next to a trivial baseline (always predict the mean action),
and saves the loss curve as a PNG. The loss falls in stages, with plateaus between them, as
the model learns to use one input after another; the default 800 steps take about 1.5 to 2
minutes on two CPU cores.
"""

import argparse
import math
import time

import torch
from matplotlib.figure import Figure  # no pyplot: writes the PNG without a display
from tqdm import tqdm

from vlakit import VLA, count_parameters
from vlakit.actions import ActionNormalizer
from vlakit.core import BidirectionalMask
from vlakit.decoders import llama
from vlakit.heads import L1RegressionHead
from vlakit.interleave import PrefixInterleaver
from vlakit.models import oft_head
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer
from vlakit.projectors import LinearProjector, ProprioProjector
from vlakit.vision import vit

# -- the task ------------------------------------------------------------------------------

IMAGE = 16  # images are IMAGE x IMAGE pixels
SQUARE = 4  # side of the coloured square, in pixels
CHUNK = 4  # actions per prediction (one chunk)
ACTION_DIM = 3  # dx, dy, gripper (0 open, 1 closed)
PROPRIO_DIM = 2  # the hand's (x, y)
# the share of the way to the square that each step of the chunk covers (sums to 1)
STEP_SHARE = torch.tensor([0.4, 0.3, 0.2, 0.1])  # [chunk]
# instruction -> (direction: +1 toward the square, -1 away; gripper on each step [chunk])
TASKS = {
    "reach the square": (1.0, [0.0, 0.0, 0.0, 0.0]),
    "grasp the square": (1.0, [0.0, 0.0, 1.0, 1.0]),
    "avoid the square": (-1.0, [0.0, 0.0, 0.0, 0.0]),
}
INSTRUCTIONS = list(TASKS)

# -- training ------------------------------------------------------------------------------

BATCH = 64
LEARNING_RATE = 2e-3
WARMUP = 20  # steps of linear learning-rate warm-up, then cosine decay to zero
PRINT_EVERY = 100
VALIDATION_SIZE = 512
THRESHOLD = 0.03  # held-out mean absolute error (raw action units) that counts as learned


def make_batch(size: int, generator: torch.Generator) -> dict:
    """``size`` random examples: images, instructions, proprio and their target actions.

    Returns a dict with ``images [size, 3, IMAGE, IMAGE]`` (uint8), ``instructions``
    (``size`` strings), ``proprio [size, 2]`` and ``actions [size, CHUNK, ACTION_DIM]``.
    """
    g = generator
    # background: dark grey noise, [size, 3, IMAGE, IMAGE]
    images = torch.randint(0, 60, (size, 3, IMAGE, IMAGE), generator=g, dtype=torch.uint8)
    # the square: a random bright colour at a random top-left corner (in pixels), [size, 2]
    corner = torch.randint(0, IMAGE - SQUARE + 1, (size, 2), generator=g)  # (x, y)
    colour = torch.randint(120, 256, (size, 3), generator=g, dtype=torch.uint8)
    for i in range(size):
        x, y = corner[i].tolist()
        images[i, :, y : y + SQUARE, x : x + SQUARE] = colour[i, :, None, None]
    # the square's centre in [-1, 1] image coordinates (x right, y down), [size, 2]
    square = 2 * (corner + SQUARE / 2) / IMAGE - 1
    # the hand: anywhere in [-1, 1]^2, [size, 2]; the model reads it as the proprio token
    hand = torch.rand(size, 2, generator=g) * 2 - 1
    task = torch.randint(0, len(TASKS), (size,), generator=g)  # [size]
    instructions = [INSTRUCTIONS[t] for t in task.tolist()]
    direction = torch.tensor([TASKS[name][0] for name in instructions])  # [size]
    gripper = torch.tensor([TASKS[name][1] for name in instructions])  # [size, chunk]
    # every step moves a share of the hand -> square vector, toward it or away from it:
    # [size, 1, 2] * [1, chunk, 1] * [size, 1, 1] -> [size, chunk, 2]
    moves = (square - hand)[:, None] * STEP_SHARE[None, :, None] * direction[:, None, None]
    actions = torch.cat((moves, gripper[..., None]), dim=-1)  # [size, chunk, 3]
    return {"images": images, "instructions": instructions, "proprio": hand, "actions": actions}


# -- the model -----------------------------------------------------------------------------


def build_model(vocab_size: int, stats: dict, head: str = "l1") -> VLA:
    """OpenVLA-OFT's layout at toy size (about 0.2M parameters). ``head``: OFT's ``"l1"``
    regression head (this script's), or its iterative ``"flow"`` or ``"diffusion"`` head
    (``vlakit.models.oft_head``; the training recipe, ``train.py --head``, offers them)."""
    d = 64  # the decoder's width
    return VLA(
        # a 16x16 image -> 4x4 patches of 4x4 pixels -> 16 tokens of width 64: [b, 16, 64]
        encoder=vit(img_size=IMAGE, patch_size=4, dim=64, depth=2, num_heads=4, mlp_dim=128),
        # [b, 16, 64] -> [b, 16, d]
        projector=LinearProjector(64, d),
        # <s>, 16 image tokens, 1 proprio token, t prompt tokens (t = 15 here), 12 action
        # slots, </s>: [b, n, d] with n = 1 + 16 + 1 + 15 + 12 + 1 = 46
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        # [b, 46, d] -> [b, 46, d]
        decoder=llama(vocab_size=vocab_size, dim=d, num_layers=2, num_heads=4, mlp_dim=128),
        # OFT decodes the whole chunk in one pass: every token sees every token
        mask_policy=BidirectionalMask(),
        # CHUNK * ACTION_DIM = 12 zero slots; the hidden states that feed them [b, 12, d]
        # (each read one position earlier, as OFT does) are regrouped to
        # [b, CHUNK, ACTION_DIM * d] and an MLP regresses [b, CHUNK, ACTION_DIM]
        head=(L1RegressionHead(d, action_dim=ACTION_DIM, chunk_size=CHUNK) if head == "l1"
              else oft_head(head, d, chunk_size=CHUNK, action_dim=ACTION_DIM)),
        # proprio [b, 2] -> one token [b, 1, d] (the hand is already in [-1, 1], so there
        # is no proprio_normalizer)
        proprio_projector=ProprioProjector(PROPRIO_DIM, d),
        # maps dx, dy to [-1, 1] with the training data's 1st/99th percentiles; the
        # gripper is already in [0, 1] and is left as it is (mask False)
        action_normalizer=ActionNormalizer(stats),
    )


def action_statistics(actions: torch.Tensor) -> dict:
    """OpenVLA-style normalisation statistics of ``actions [n, CHUNK, ACTION_DIM]``."""
    actions = actions.flatten(0, 1)  # [n * CHUNK, ACTION_DIM]
    return {
        "q01": torch.quantile(actions, 0.01, dim=0).tolist(),
        "q99": torch.quantile(actions, 0.99, dim=0).tolist(),
        "mask": [True, True, False],
    }


def plot_losses(losses: list[float], baseline: float, path: str) -> None:
    """The training loss per step, its running mean, and the mean-action baseline."""
    window = 20
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window)
              for i in range(len(losses))]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(range(1, len(losses) + 1), smooth, color="tab:blue",
            label=f"running mean ({window} steps)")
    ax.axhline(baseline, color="tab:red", linestyle="--",
               label="predict the mean action (held out)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("L1 loss (normalised actions)")
    ax.set_title("train_tiny.py: a tiny OpenVLA-OFT-style model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps")
    parser.add_argument("--out", default="train_tiny_loss.png", help="loss curve (PNG)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    args = parser.parse_args()
    start = time.perf_counter()
    # The matrices are tiny: one thread is faster than several (which wait on each other).
    torch.set_num_threads(1)

    # Three independent random streams: training data, validation data, model weights.
    train_data = torch.Generator().manual_seed(args.seed)
    val_data = torch.Generator().manual_seed(args.seed + 1_000_003)
    torch.manual_seed(args.seed)

    # A tokenizer that knows only the prompt's and the instructions' words (in memory).
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *INSTRUCTIONS])
    # A sample of the training distribution gives the normalisation statistics (and the
    # mean action, the baseline): [4096, CHUNK, ACTION_DIM]
    sample = make_batch(4096, train_data)["actions"]
    model = build_model(len(tokenizer), action_statistics(sample))
    # The processor preprocesses images the way the encoder wants them and formats,
    # tokenizes and pads the prompts: "In: What action should the robot take to ...?\nOut:"
    processor = OpenVLAProcessor.from_model(tokenizer, model)
    print(f"built a tiny OpenVLA-OFT-style VLA: {count_parameters(model):,} parameters")

    def inputs(batch: dict, with_actions: bool = True):
        # VLAInputs: input_ids [b, t], pixels [b, 1, 3, 16, 16], proprio [b, 2],
        # actions [b, CHUNK, ACTION_DIM] (raw: the model normalises them itself)
        return processor(batch["images"], batch["instructions"], proprio=batch["proprio"],
                         actions=batch["actions"] if with_actions else None)

    # The held-out set: drawn once, from its own seed.
    val = make_batch(VALIDATION_SIZE, val_data)
    val_inputs = inputs(val, with_actions=False)

    # AdamW with a short warm-up, then cosine decay to zero.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / WARMUP)
        * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)),
    )

    losses = []
    model.train()
    progress = tqdm(range(1, args.steps + 1), desc="training", unit="step")
    for step in progress:
        # A fresh batch every step (the generator makes the run reproducible).
        loss = model(inputs(make_batch(BATCH, train_data))).loss  # scalar: L1, normalised
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if step == 1 or step % PRINT_EVERY == 0 or step == args.steps:
            tqdm.write(f"step {step:>4}  loss {losses[-1]:.4f}")
    progress.close()

    # Held-out error, in raw action units, against always predicting the training mean.
    model.eval()
    with torch.no_grad():
        predicted = model.predict_action(val_inputs)  # [VALIDATION_SIZE, CHUNK, ACTION_DIM]
    target = val["actions"]  # [VALIDATION_SIZE, CHUNK, ACTION_DIM]
    mean_action = sample.mean(0)  # [CHUNK, ACTION_DIM]
    per_dim = (predicted - target).abs().mean((0, 1))  # [ACTION_DIM]
    error = per_dim.mean().item()
    baseline = (mean_action - target).abs().mean().item()
    # the baseline's loss in the units of the training loss, for the plot
    normalize = model.action_normalizer.normalize
    baseline_loss = (normalize(mean_action.expand_as(target)) - normalize(target)).abs().mean()

    print(f"final loss (mean of the last 20 steps): {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    print(f"held-out mean absolute error: {error:.4f} (threshold {THRESHOLD}; "
          f"predicting the mean action: {baseline:.4f})")
    print("  per dimension (dx, dy, gripper): " + ", ".join(f"{v:.4f}" for v in per_dim))
    print("learned the task" if error < THRESHOLD else "not below the threshold yet")
    for i in range(3):  # a few held-out chunks, one (dx, dy, gripper) per step
        print(f"  {val['instructions'][i]!r}")
        print(f"    predicted {[[round(v, 2) for v in row] for row in predicted[i].tolist()]}")
        print(f"    target    {[[round(v, 2) for v in row] for row in target[i].tolist()]}")

    plot_losses(losses, baseline_loss.item(), args.out)
    print(f"wrote the loss curve to {args.out}")
    print(f"took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
