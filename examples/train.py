"""The training recipe: one script for a CPU, one GPU or many, under ``torchrun``.

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
``--lora``: OFT's LoRA recipe (``oft_lora``) or openpi's for pi0 (``pi0_lora``); swap in
your own builder. What the recipe does:
DDP or FSDP2 (``vlakit.distributed.parallelize``: activation checkpointing per block,
per-block compile, FSDP2 per block then the root), bf16 autocast, gradient accumulation, a
warm-up + cosine learning-rate schedule, a distributed checkpoint (``torch.distributed
.checkpoint``) written under a temporary name and renamed, exact resume (``--resume``, with
the same number of processes: the data of each step is drawn from a generator seeded by the
step; the training noise and times of flow and diffusion heads from one generator per
process, passed to the model as ``Sampling(generator=...)``; that generator's state and
torch's global random state (LightVLA's training noise) are saved per process in the
checkpoint and restored), tqdm on rank 0, the loss curve as CSV and PNG (labelled with the
head's loss), and LightVLA's noise schedule when the model has a LightVLA pruner
(``--lightvla``). Bad set-ups fail before any step: a world size that does not divide the
batch, a resume from a checkpoint of another composition or another number of processes.
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
from vlakit.bundle import ObservationKeys, PolicyBundle  # noqa: E402
from vlakit.core import BidirectionalMask, building, describe, rebuild  # noqa: E402
from vlakit.data import collate_with  # noqa: E402
from vlakit.decoders import llama  # noqa: E402
from vlakit.distributed import (  # noqa: E402
    checkpoint_blocks,
    compile_blocks,
    oft_lora,
    parallelize,
    pi0_lora,
)
from vlakit.heads import (  # noqa: E402
    DiffusionActionHead,
    DiscreteActionHead,
    FlowMatchingHead,
    L1RegressionHead,
    NextTokenHead,
    Pi0Head,
    Pi05Head,
    Sampling,
)
from vlakit.interleave import PlaceholderInterleaver, PrefixInterleaver  # noqa: E402
from vlakit.models import (  # noqa: E402
    oft_head,
    pi0,
    pi0_decoder,
    pi0_expert,
    pi0_preprocessing,
)
from vlakit.processors import (  # noqa: E402
    OPENVLA_PROMPT,
    OpenVLAProcessor,
    Pi0Processor,
    word_tokenizer,
)
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
    p.add_argument("--head", choices=("l1", "flow", "diffusion"), default="l1",
                   help="OFT's action head: L1 regression, flow matching or diffusion")
    p.add_argument("--model", choices=("oft", "pi0"), default="oft",
                   help="a tiny OpenVLA-OFT-style model, or a tiny pi0 (needs --data)")
    p.add_argument("--lora", action="store_true",
                   help="LoRA: OFT's recipe (oft_lora) or openpi's for pi0 (pi0_lora)")
    p.add_argument("--data", default=None, help="a LeRobot v3 folder (default: the synthetic "
                   "task)")
    p.add_argument("--chunk", type=int, default=4, help="actions per chunk (with --data)")
    p.add_argument("--out", default="train_run")
    p.add_argument("--save-every", type=int, default=0, help="0: only at the end")
    p.add_argument("--stop-after", type=int, default=None, help="leave after this step")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
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


def processor_for(tokenizer, model: VLA):
    """The model's processor: ``Pi0Processor`` for pi0, ``OpenVLAProcessor`` otherwise."""
    if isinstance(model.interleaver, PlaceholderInterleaver):
        return Pi0Processor.from_model(tokenizer, model)
    return OpenVLAProcessor.from_model(tokenizer, model)


def noise_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """This process's generator of training draws (the noise and times of flow and diffusion
    heads): seeded from the run's seed and the rank, a stream apart from the data's
    (``seed * 100003 + step``), on the model's device (the heads draw there)."""
    return torch.Generator(device=device).manual_seed((1 << 40) + (seed << 16) + rank)


def random_state(noise: torch.Generator, device: torch.device) -> dict:
    """Everything this process draws from: the noise generator and torch's global state
    (CPU, and the device's on CUDA)."""
    state = {"noise": noise.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(noise: torch.Generator, device: torch.device, state: dict) -> None:
    noise.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def loss_label(head) -> str:
    """The y-axis of the loss plot: what ``head``'s training loss is."""
    labels = [(L1RegressionHead, "L1, normalised actions"),
              (FlowMatchingHead, "flow-matching velocity MSE, normalised actions"),
              ((Pi0Head, Pi05Head), "pi0 flow-matching velocity MSE, normalised actions"),
              (DiffusionActionHead, "diffusion noise-prediction MSE"),
              (DiscreteActionHead, "action-token cross-entropy"),
              (NextTokenHead, "next-token cross-entropy")]
    what = next((text for kind, text in labels if isinstance(head, kind)), type(head).__name__)
    return f"training loss ({what})"


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
    if args.model == "pi0" and not args.data:
        raise SystemExit("--model pi0 trains on a LeRobot folder: pass --data FOLDER")
    if args.model == "pi0" and args.head != "l1":
        raise SystemExit("--head picks OFT's head; pi0 has its own flow head: drop --head")
    if args.strategy != "none" and not distributed:
        raise SystemExit(f"--strategy {args.strategy} needs torchrun (a process group)")
    micro = args.batch // (world * args.accum)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    dataset = None
    if args.data:
        from vlakit.data import LeRobotDataset

        dataset = LeRobotDataset(args.data, chunk_size=args.chunk)  # checks the folder first
        tokenizer = word_tokenizer([OPENVLA_PROMPT, *dataset.tasks.values()])
        if args.model == "pi0":
            model = build_pi0_model(len(tokenizer), dataset)
        else:
            model = build_dataset_model(len(tokenizer), dataset, args.head)
        dataset.check_model(model)
    else:
        stats = action_statistics(make_batch(2048, torch.Generator().manual_seed(1))["actions"])
        tokenizer = word_tokenizer([OPENVLA_PROMPT, *INSTRUCTIONS])
        model = build_model(len(tokenizer), stats, args.head)
    if args.lightvla:
        model.add_pruner(LightVLAPruner())  # recorded: the saved policy keeps it
    if args.lora:  # recorded too: the saved policy holds the LoRA layers
        (pi0_lora if args.model == "pi0" else oft_lora)(model)
    processor = processor_for(tokenizer, model)
    description = describe(model)  # the composition, before it is moved and sharded
    collate = collate_with(processor)
    label = loss_label(model.head)
    # the heads' training draws: from this generator, never from torch's global state
    noise = noise_generator(args.seed, rank, device)
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
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA freezes the rest
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))

    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = os.path.join(args.out, "checkpoint")
    start, losses = 0, []
    if args.resume and os.path.isdir(checkpoint):
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.api import CheckpointException

        with open(os.path.join(checkpoint, "progress.json")) as f:
            progress = json.load(f)
        written_by = progress.get("world")
        random_file = os.path.join(checkpoint, f"random-{rank}.pt")
        if written_by is not None and written_by != world:
            raise SystemExit(f"cannot resume from {checkpoint} exactly: it was written by "
                             f"{written_by} processes and this run has {world}; each "
                             f"process's random state (the heads' training noise) is saved "
                             f"with it: resume with --nproc_per_node={written_by}")
        if written_by is None or not os.path.isfile(random_file):
            raise SystemExit(f"cannot resume from {checkpoint} exactly: it holds no random "
                             f"state for process {rank} (an older recipe wrote it); start "
                             f"a new run (another --out)")
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
        start, losses = progress["step"], progress["losses"]
        schedule.load_state_dict(progress["schedule"])
        # the next step draws what the uninterrupted run's next step draws
        set_random_state(noise, device, torch.load(random_file, weights_only=True))

    def write_checkpoint(step: int) -> None:
        temporary = checkpoint + ".tmp"
        if rank == 0 and os.path.isdir(temporary):
            shutil.rmtree(temporary)
        if distributed:
            dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        save({"model": model_state, "optim": optim_state}, checkpoint_id=temporary)
        os.makedirs(temporary, exist_ok=True)
        # each process's random state, for the next step's draws
        torch.save(random_state(noise, device), os.path.join(temporary, f"random-{rank}.pt"))
        if distributed:
            dist.barrier()  # every process's file is written before the rename
        if rank == 0:
            with open(os.path.join(temporary, "progress.json"), "w") as f:
                json.dump({"step": step, "losses": losses, "world": world,
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
                loss = wrapped(batch, sampling=Sampling(generator=noise)).loss / args.accum
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
        _plot(losses, os.path.join(args.out, "loss.png"), label)
        print(f"steps {len(losses)}, world {world}, strategy {args.strategy}, {label}: "
              f"first loss {losses[0]:.5f}, last loss {losses[-1]:.5f}")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # every rank takes part in gathering the full weights (FSDP2 shards them)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(args.out, "final_weights.pt"))
        # the deployable artefact: model, tokenizer, processor, statistics, observation keys
        with building(None, "meta"):
            trained = rebuild(description)
        trained.load_state_dict(full)  # fills the meta parameters
        policy = PolicyBundle(trained.eval(), processor_for(tokenizer, trained),
                              ObservationKeys.for_model(trained))
        policy.save(os.path.join(args.out, "policy"))
    if distributed:
        dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _plot(losses: list[float], path: str, label: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
