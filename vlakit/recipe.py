"""The training recipe: one function (and ``vlakit train``) for a CPU, one GPU or many.

```
model (a VLA, or a builder) ─┐
data (a dataset or a sampler)┼─ train(model, data, tokenizer, TrainOptions(...)) ─ out/
tokenizer ───────────────────┘      loss.csv, loss.png, checkpoint/ (DCP, exact resume),
                                    policy/ (a PolicyBundle: at each save and at the end)
```

Under ``torchrun`` the process group is made from the environment. What it does: DDP or
FSDP2 ([parallelize][vlakit.distributed.parallelize]: activation checkpointing per block,
per-block compile, FSDP2 per block then the root), bf16 autocast, gradient accumulation, a
warm-up + cosine learning-rate schedule, a distributed checkpoint
(``torch.distributed.checkpoint``) written under a temporary name and renamed, exact resume
(the same number of processes: the data of each step is drawn from a generator seeded by
the step; the training noise and times of flow and diffusion heads from one generator per
process passed as ``Sampling(generator=...)``; that generator's state and torch's global
random state are saved per process and restored), a progress bar on rank 0, the loss
curve as CSV and PNG (labelled with the head's loss), and LightVLA's noise schedule when
the model has a LightVLA pruner. Bad set-ups raise
[RecipeError][vlakit.recipe.RecipeError] before any step: a world size that does not
divide the batch, a strategy without a process group, a resume from a checkpoint of
another composition or another number of processes.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlakit.bundle import ObservationKeys, PolicyBundle
from vlakit.core import building, describe, rebuild
from vlakit.data import collate_with
from vlakit.distributed import checkpoint_blocks, compile_blocks, parallelize
from vlakit.heads import (
    DiffusionActionHead,
    DiscreteActionHead,
    FlowMatchingHead,
    L1RegressionHead,
    NextTokenHead,
    Pi0Head,
    Pi05Head,
    Sampling,
)
from vlakit.interleave import PlaceholderInterleaver
from vlakit.processors import OpenVLAProcessor, PaliGemmaProcessor, Pi0Processor, Pi05Processor
from vlakit.pruners import LightVLAPruner, lightvla_noise_scale, set_noise_scale

__all__ = ["TrainOptions", "RecipeError", "train", "processor_for", "loss_label",
           "add_arguments", "options_from"]

STRATEGIES = ("none", "ddp", "fsdp")


class RecipeError(ValueError):
    """A training set-up that cannot work, found before the first step."""


@dataclasses.dataclass
class TrainOptions:
    """The recipe's options (``vlakit train``'s flags of the same names).

    Attributes:
        steps: optimiser steps.
        batch: global batch (all ranks, all accumulation steps).
        accum: gradient accumulation steps.
        lr: peak learning rate (AdamW, no weight decay).
        warmup: steps of linear warm-up, then cosine decay to zero.
        strategy: ``"none"``, ``"ddp"`` or ``"fsdp"`` (FSDP2).
        bf16: bf16 autocast.
        activation_checkpointing: per block.
        compile: ``torch.compile`` per block.
        out: the run's directory.
        save_every: checkpoint (and bundle) every this many steps (0: at the end only).
        stop_after: leave after this step (to test resuming).
        resume: continue from ``out/checkpoint`` when it exists.
        seed: the run's seed (weights are the caller's; data and noise derive from it).
        lightvla_noise: anneal the training noise of a LightVLA pruner in the model
            (LightVLA's schedule, [lightvla_noise_scale][vlakit.pruners.lightvla_noise_scale]).
    """

    steps: int = 200
    batch: int = 32
    accum: int = 1
    lr: float = 2e-3
    warmup: int = 20
    strategy: str = "none"
    bf16: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    out: str | os.PathLike = "train_run"
    save_every: int = 0
    stop_after: int | None = None
    resume: bool = False
    seed: int = 0
    lightvla_noise: bool = True


def add_arguments(parser: Any) -> None:
    """Add the recipe's options to an ``argparse`` parser as flags (``--steps``,
    ``--batch``, ``--accum``, ``--lr``, ``--warmup``, ``--strategy``, ``--bf16``, ``--ac``,
    ``--compile``, ``--no-lightvla-noise``, ``--out``, ``--save-every``, ``--stop-after``,
    ``--resume``, ``--seed``); [options_from][vlakit.recipe.options_from] reads them back."""
    defaults = TrainOptions()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch,
                        help="global batch (all ranks)")
    parser.add_argument("--accum", type=int, default=defaults.accum,
                        help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--compile", action="store_true", help="torch.compile per block")
    parser.add_argument("--no-lightvla-noise", action="store_true",
                        help="do not anneal a LightVLA pruner's training noise")
    parser.add_argument("--out", default=str(defaults.out))
    parser.add_argument("--save-every", type=int, default=defaults.save_every,
                        help="0: only at the end")
    parser.add_argument("--stop-after", type=int, default=None, help="leave after this step")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def options_from(args: Any) -> TrainOptions:
    """The [TrainOptions][vlakit.recipe.TrainOptions] of flags added by
    [add_arguments][vlakit.recipe.add_arguments]."""
    return TrainOptions(steps=args.steps, batch=args.batch, accum=args.accum, lr=args.lr,
                        warmup=args.warmup, strategy=args.strategy, bf16=args.bf16,
                        activation_checkpointing=args.ac, compile=args.compile, out=args.out,
                        save_every=args.save_every, stop_after=args.stop_after,
                        resume=args.resume, seed=args.seed,
                        lightvla_noise=not args.no_lightvla_noise)


# -- pieces ------------------------------------------------------------------------------------


def processor_for(tokenizer: Any, model: Any) -> Any:
    """The processor of a model's family: ``Pi0Processor`` / ``Pi05Processor`` for pi0 /
    pi0.5 heads, ``PaliGemmaProcessor`` for other placeholder layouts, ``OpenVLAProcessor``
    otherwise (built with ``from_model``)."""
    if isinstance(model.head, Pi05Head):
        return Pi05Processor.from_model(tokenizer, model)
    if isinstance(model.head, Pi0Head):
        return Pi0Processor.from_model(tokenizer, model)
    if isinstance(model.interleaver, PlaceholderInterleaver):
        return PaliGemmaProcessor.from_model(tokenizer, model)
    return OpenVLAProcessor.from_model(tokenizer, model)


def loss_label(head: Any) -> str:
    """The y-axis of the loss plot: what ``head``'s training loss is."""
    labels = [(L1RegressionHead, "L1, normalised actions"),
              (FlowMatchingHead, "flow-matching velocity MSE, normalised actions"),
              ((Pi0Head, Pi05Head), "pi0 flow-matching velocity MSE, normalised actions"),
              (DiffusionActionHead, "diffusion noise-prediction MSE"),
              (DiscreteActionHead, "action-token cross-entropy"),
              (NextTokenHead, "next-token cross-entropy")]
    what = next((text for kind, text in labels if isinstance(head, kind)), type(head).__name__)
    return f"training loss ({what})"


def _noise_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    # a stream apart from the data's (seed * 100003 + step), on the model's device
    return torch.Generator(device=device).manual_seed((1 << 40) + (seed << 16) + rank)


def _random_state(noise: torch.Generator, device: torch.device) -> dict:
    state = {"noise": noise.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_random_state(noise: torch.Generator, device: torch.device, state: dict) -> None:
    noise.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return scale


def _plot(losses: list[float], path: Path, label: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # the viz extra is optional: the CSV is always written
        return
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)




# -- the recipe --------------------------------------------------------------------------------


def train(
    model: Any,
    data: Any,
    tokenizer: Any,
    options: TrainOptions | None = None,
    *,
    processor: Any = None,
    keys: ObservationKeys | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train ``model`` on ``data`` with the recipe; returns the policy bundle's directory
    (``out/policy``).

    Args:
        model: a [VLA][vlakit.VLA] (the same initial weights on every rank: build it after
            ``torch.manual_seed``), or a callable ``build(data, tokenizer) -> VLA``.
        data: a dataset of samples (``images [v, 3, h, w]``, ``instruction``, ``actions``,
            ``proprio``, optionally ``action_is_pad``: a
            [LeRobotDataset][vlakit.data.LeRobotDataset]), batched through the processor;
            or a sampler ``data(size, generator) -> {"images", "instructions", "actions",
            "proprio"}`` (a synthetic task drawn fresh every step).
        tokenizer: the model's tokenizer (saved with the policy).
        options: [TrainOptions][vlakit.recipe.TrainOptions].
        processor: default [processor_for][vlakit.recipe.processor_for] the model.
        keys: the policy's observation keys (default
            [ObservationKeys.for_model][vlakit.bundle.ObservationKeys.for_model]).
        log: where the summary line goes (rank 0).
    """
    options = TrainOptions() if options is None else options
    if options.strategy not in STRATEGIES:
        raise RecipeError(f"strategy must be one of {STRATEGIES}, got {options.strategy!r}")
    created = "RANK" in os.environ and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        return _train(model, data, tokenizer, options, processor, keys, log)
    finally:
        if created:
            dist.destroy_process_group()


def _train(model, data, tokenizer, options, processor, keys, log) -> Path:
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
                          if torch.cuda.is_available() else "cpu")
    if options.batch % (world * options.accum):
        raise RecipeError(f"--batch {options.batch} is not divisible by world size {world} x "
                          f"--accum {options.accum}: each rank needs the same micro-batch")
    if options.strategy != "none" and not distributed:
        raise RecipeError(f"--strategy {options.strategy} needs torchrun (a process group)")
    micro = options.batch // (world * options.accum)
    if not isinstance(model, torch.nn.Module):
        model = model(data, tokenizer)
    check = getattr(data, "check_model", None)  # a LeRobotDataset checks chunk and widths
    if callable(check):
        check(model)
    processor = processor_for(tokenizer, model) if processor is None else processor
    description = describe(model)  # the composition, before it is moved and sharded
    sampler = data if callable(data) and not isinstance(data, torch.utils.data.Dataset) \
        else None
    collate = collate_with(processor)
    label = loss_label(model.head)
    lightvla = options.lightvla_noise and isinstance(model.pruner, LightVLAPruner)
    noise = _noise_generator(options.seed, rank, device)  # the heads' training draws
    model = model.to(device).train()
    if options.strategy == "fsdp":
        model = parallelize(model, activation_checkpointing=options.activation_checkpointing,
                            compile=options.compile)
        wrapped = model
    else:
        if options.activation_checkpointing:
            checkpoint_blocks(model)
        if options.compile:
            compile_blocks(model)
        # an action head leaves the LM head without gradients: DDP must be told
        wrapped = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
                   if options.strategy == "ddp" else model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA freezes the rest
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 _lr_lambda(options.warmup, options.steps))

    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = Path(options.out)
    checkpoint = out / "checkpoint"
    start, losses = 0, []
    if options.resume and checkpoint.is_dir():
        start, losses = _resume(model, optimizer, schedule, noise, device, checkpoint, rank,
                                world, load, get_state_dict, set_state_dict)

    def save_policy() -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # every rank takes part in gathering the full weights (FSDP2 shards them)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
        if rank == 0:
            torch.save(full, out / "final_weights.pt")
            with building(None, "meta"):
                trained = rebuild(description)
            trained.load_state_dict(full)  # fills the meta parameters
            bundle_keys = ObservationKeys.for_model(trained) if keys is None else keys
            PolicyBundle(trained.eval(), processor_for(tokenizer, trained)
                         if processor is None else type(processor).from_model(tokenizer,
                                                                              trained),
                         bundle_keys).save(out / "policy")
        if distributed:
            dist.barrier()

    def write_checkpoint(step: int) -> None:
        temporary = Path(str(checkpoint) + ".tmp")
        if rank == 0 and temporary.is_dir():
            shutil.rmtree(temporary)
        if distributed:
            dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        save({"model": model_state, "optim": optim_state}, checkpoint_id=str(temporary))
        temporary.mkdir(parents=True, exist_ok=True)
        torch.save(_random_state(noise, device), temporary / f"random-{rank}.pt")
        if distributed:
            dist.barrier()  # every process's file is written before the rename
        if rank == 0:
            (temporary / "progress.json").write_text(json.dumps(
                {"step": step, "losses": losses, "world": world,
                 "schedule": schedule.state_dict()}))
            if checkpoint.is_dir():
                shutil.rmtree(checkpoint)
            os.replace(temporary, checkpoint)  # never a half-written checkpoint
        if distributed:
            dist.barrier()

    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16)
    bar = tqdm(range(start, options.steps), disable=rank != 0, desc="train")
    for step in bar:
        if lightvla:
            set_noise_scale(model, lightvla_noise_scale(step, options.steps))
        generator = torch.Generator().manual_seed(options.seed * 100003 + step)  # exact resume
        if sampler is not None:
            drawn = sampler(options.batch, generator)
        else:
            picks = torch.randint(len(data), (options.batch,), generator=generator).tolist()
        total = torch.zeros((), device=device)
        for k in range(options.accum):
            first = (k * world + rank) * micro  # this rank's rows of micro-batch k
            rows = slice(first, first + micro)
            if sampler is not None:
                batch = processor(drawn["images"][rows], drawn["instructions"][rows],
                                  actions=drawn["actions"][rows], proprio=drawn["proprio"][rows])
            else:
                batch = collate([data[i] for i in picks[rows]])
            batch = batch.to(device)
            last = k == options.accum - 1
            sync = (wrapped.no_sync() if options.strategy == "ddp" and not last
                    else contextlib.nullcontext())
            with sync, autocast:
                loss = wrapped(batch, sampling=Sampling(generator=noise)).loss / options.accum
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
        if options.save_every and done % options.save_every == 0 and done < options.steps:
            write_checkpoint(done)
            save_policy()
        if options.stop_after is not None and done >= options.stop_after:
            break
    write_checkpoint(len(losses))
    if rank == 0:
        with open(out / "loss.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss"])
            writer.writerows(enumerate(losses, start=1))
        _plot(losses, out / "loss.png", label)
        log(f"steps {len(losses)}, world {world}, strategy {options.strategy}, {label}: "
            f"first loss {losses[0]:.5f}, last loss {losses[-1]:.5f}")
    save_policy()
    return out / "policy"


def _resume(model, optimizer, schedule, noise, device, checkpoint: Path, rank: int, world: int,
            load, get_state_dict, set_state_dict) -> tuple[int, list[float]]:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    progress = json.loads((checkpoint / "progress.json").read_text())
    written_by = progress.get("world")
    random_file = checkpoint / f"random-{rank}.pt"
    if written_by is not None and written_by != world:
        raise RecipeError(f"cannot resume from {checkpoint} exactly: it was written by "
                          f"{written_by} processes and this run has {world}; each process's "
                          f"random state (the heads' training noise) is saved with it: resume "
                          f"with --nproc_per_node={written_by}")
    if written_by is None or not random_file.is_file():
        raise RecipeError(f"cannot resume from {checkpoint} exactly: it holds no random state "
                          f"for process {rank} (an older recipe wrote it); start a new run "
                          f"(another --out)")
    model_state, optim_state = get_state_dict(model, optimizer)
    try:  # the weights strictly; the optimiser has no state for parameters that never had a
        # gradient (an unused LM head), so its load may be partial
        load({"model": model_state}, checkpoint_id=str(checkpoint))
        load({"optim": optim_state}, checkpoint_id=str(checkpoint),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    except (Exception, CheckpointException) as error:  # DCP's is a BaseException
        raise RecipeError(f"cannot resume from {checkpoint}: it holds another composition or "
                          f"optimiser ({type(error).__name__}: {error})") from None
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=optim_state)
    schedule.load_state_dict(progress["schedule"])
    # the next step draws what the uninterrupted run's next step draws
    _set_random_state(noise, device, torch.load(random_file, weights_only=True))
    return progress["step"], progress["losses"]

