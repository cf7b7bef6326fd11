"""The training recipe: one script for a CPU, one GPU or many, under ``torchrun``.

    python examples/train.py --steps 200                          # one process
    torchrun --nproc_per_node=2 examples/train.py --strategy ddp  # DDP (gloo on CPU)
    torchrun --nproc_per_node=8 examples/train.py --strategy fsdp --bf16 --ac   # FSDP2

The model and task are ``train_tiny.py``'s (a tiny OpenVLA-OFT-style model with an L1 head
on a synthetic, learnable task), or ``--data FOLDER``: a LeRobot v3 dataset (every camera a
view, the state as proprio, its statistics for normalisation) read with
``vlakit.data.LeRobotDataset`` and batched through the processor; swap in your own builder.
What the recipe does:
DDP or FSDP2 (``vlakit.distributed.parallelize``: activation checkpointing per block,
per-block compile, FSDP2 per block then the root), bf16 autocast, gradient accumulation, a
warm-up + cosine learning-rate schedule, a distributed checkpoint (``torch.distributed
.checkpoint``) written under a temporary name and renamed, exact resume (``--resume``: the
data of each step is drawn from a generator seeded by the step), tqdm on rank 0, the loss
curve as CSV and PNG, and LightVLA's noise schedule when the model has a LightVLA pruner
(``--lightvla``). Bad set-ups fail before any step: a world size that does not divide the
batch, a resume from a checkpoint of another composition.
"""

import argparse
import csv
import json
import math
import os
import shutil
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import INSTRUCTIONS, action_statistics, build_model, make_batch  # noqa: E402

from vlakit import VLA  # noqa: E402
from vlakit.actions import ActionNormalizer  # noqa: E402
from vlakit.core import BidirectionalMask  # noqa: E402
from vlakit.data import collate_with  # noqa: E402
from vlakit.decoders import llama  # noqa: E402
from vlakit.distributed import checkpoint_blocks, compile_blocks, parallelize  # noqa: E402
from vlakit.heads import L1RegressionHead  # noqa: E402
from vlakit.interleave import PrefixInterleaver  # noqa: E402
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer  # noqa: E402
from vlakit.projectors import LinearProjector, ProprioProjector  # noqa: E402
from vlakit.pruners import LightVLAPruner, lightvla_noise_scale, set_noise_scale  # noqa: E402
from vlakit.vision import vit  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="global batch (all ranks)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--strategy", choices=("none", "ddp", "fsdp"), default="none")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true", help="torch.compile per block")
    p.add_argument("--lightvla", action="store_true", help="a LightVLA pruner, noise annealed")
    p.add_argument("--data", default=None, help="a LeRobot v3 folder (default: the synthetic "
                   "task)")
    p.add_argument("--chunk", type=int, default=4, help="actions per chunk (with --data)")
    p.add_argument("--out", default="train_run")
    p.add_argument("--save-every", type=int, default=0, help="0: only at the end")
    p.add_argument("--stop-after", type=int, default=None, help="leave after this step")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_dataset_model(vocab_size: int, dataset) -> VLA:
    """A tiny OFT-style model for a LeRobot dataset: its cameras as views (resized to 32 px
    by the processor), its state as the proprio token, its action width and chunk, its
    statistics for (un)normalisation."""
    stats = dataset.statistics()
    d = 64
    return VLA(
        encoder=vit(img_size=32, patch_size=8, dim=64, depth=2, num_heads=4, mlp_dim=128),
        projector=LinearProjector(64, d),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=vocab_size, dim=d, num_layers=2, num_heads=4, mlp_dim=128),
        mask_policy=BidirectionalMask(),
        head=L1RegressionHead(d, action_dim=dataset.action_dim, chunk_size=dataset.chunk_size),
        proprio_projector=ProprioProjector(dataset.state_dim, d),
        action_normalizer=ActionNormalizer.from_stats(stats),
        proprio_normalizer=ActionNormalizer.from_stats(stats, key="proprio"),
        num_views=len(dataset.cameras),
    )


def lr_lambda(warmup: int, total: int):
    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return scale


def main() -> None:
    args = parse()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                          else "cpu")
    if args.batch % (world * args.accum):
        raise SystemExit(f"--batch {args.batch} is not divisible by world size {world} x "
                         f"--accum {args.accum}: each rank needs the same micro-batch")
    if args.strategy != "none" and not distributed:
        raise SystemExit(f"--strategy {args.strategy} needs torchrun (a process group)")
    micro = args.batch // (world * args.accum)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    dataset = None
    if args.data:
        from vlakit.data import LeRobotDataset

        dataset = LeRobotDataset(args.data, chunk_size=args.chunk)  # checks the folder first
        tokenizer = word_tokenizer([OPENVLA_PROMPT, *dataset.tasks.values()])
        model = build_dataset_model(len(tokenizer), dataset)
        dataset.check_model(model)
    else:
        stats = action_statistics(make_batch(2048, torch.Generator().manual_seed(1))["actions"])
        tokenizer = word_tokenizer([OPENVLA_PROMPT, *INSTRUCTIONS])
        model = build_model(len(tokenizer), stats)
    if args.lightvla:
        model = VLA(**{**model.__dict__["_recorded_init"][1], "pruner": LightVLAPruner()})
    processor = OpenVLAProcessor.from_model(tokenizer, model)
    collate = collate_with(processor)
    model = model.to(device).train()
    if args.strategy == "fsdp":
        model = parallelize(model, activation_checkpointing=args.ac, compile=args.compile)
        wrapped = model
    else:
        if args.ac:
            checkpoint_blocks(model)
        if args.compile:
            compile_blocks(model)
        # an action head leaves the LM head without gradients: DDP must be told
        wrapped = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
                   if args.strategy == "ddp" else model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))

    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = os.path.join(args.out, "checkpoint")
    start, losses = 0, []
    if args.resume and os.path.isdir(checkpoint):
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.api import CheckpointException

        model_state, optim_state = get_state_dict(model, optimizer)
        try:  # the weights strictly; the optimiser has no state for parameters that never
            # had a gradient (an unused LM head), so its load may be partial
            load({"model": model_state}, checkpoint_id=checkpoint)
            load({"optim": optim_state}, checkpoint_id=checkpoint,
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            raise SystemExit(f"cannot resume from {checkpoint}: it holds another "
                             f"composition or optimiser ({type(error).__name__}: "
                             f"{error})") from None
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optim_state)
        with open(os.path.join(checkpoint, "progress.json")) as f:
            progress = json.load(f)
        start, losses = progress["step"], progress["losses"]
        schedule.load_state_dict(progress["schedule"])

    def write_checkpoint(step: int) -> None:
        temporary = checkpoint + ".tmp"
        if rank == 0 and os.path.isdir(temporary):
            shutil.rmtree(temporary)
        if distributed:
            dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        save({"model": model_state, "optim": optim_state}, checkpoint_id=temporary)
        if rank == 0:
            with open(os.path.join(temporary, "progress.json"), "w") as f:
                json.dump({"step": step, "losses": losses,
                           "schedule": schedule.state_dict()}, f)
            if os.path.isdir(checkpoint):
                shutil.rmtree(checkpoint)
            os.replace(temporary, checkpoint)  # never a half-written checkpoint
        if distributed:
            dist.barrier()

    os.makedirs(args.out, exist_ok=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    bar = tqdm(range(start, args.steps), disable=rank != 0, desc="train")
    for step in bar:
        if args.lightvla:
            set_noise_scale(model, lightvla_noise_scale(step, args.steps))
        generator = torch.Generator().manual_seed(args.seed * 100003 + step)  # exact resume
        if dataset is None:
            data = make_batch(args.batch, generator)
        else:
            picks = torch.randint(len(dataset), (args.batch,), generator=generator).tolist()
        total = torch.zeros((), device=device)
        for k in range(args.accum):
            first = (k * world + rank) * micro  # this rank's rows of micro-batch k
            rows = slice(first, first + micro)
            if dataset is None:
                batch = processor(data["images"][rows], data["instructions"][rows],
                                  actions=data["actions"][rows], proprio=data["proprio"][rows])
            else:
                batch = collate([dataset[i] for i in picks[rows]])
            batch = batch.to(device)
            last = k == args.accum - 1
            sync = (wrapped.no_sync() if args.strategy == "ddp" and not last
                    else _nothing())
            with sync, autocast:
                loss = wrapped(batch).loss / args.accum
            loss.backward()
            total += loss.detach()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if distributed:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        losses.append(float(total))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            write_checkpoint(done)
        if args.stop_after is not None and done >= args.stop_after:
            break
    write_checkpoint(len(losses))
    if rank == 0:
        with open(os.path.join(args.out, "loss.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss"])
            writer.writerows(enumerate(losses, start=1))
        _plot(losses, os.path.join(args.out, "loss.png"))
        print(f"steps {len(losses)}, world {world}, strategy {args.strategy}: first loss "
              f"{losses[0]:.5f}, last loss {losses[-1]:.5f}")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # every rank takes part in gathering the full weights (FSDP2 shards them)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(args.out, "final_weights.pt"))
    if distributed:
        dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _plot(losses: list[float], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (L1, normalised actions)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
