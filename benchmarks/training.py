"""Training throughput and memory: the recipe's options side by side on one assembly.

The assembly: two 224 px views (2 x 256 patches) through a small ViT (width 256, 2 blocks),
a linear projector, a Llama-shaped decoder d = 1024, 8 layers, 16 heads, MLP 2752, and
OpenVLA-OFT's L1 head (chunk 8 x 7) under its bidirectional mask: 592 tokens per example,
about 120 M parameters. One training step = forward, backward and an AdamW step on a batch
of ``--batch`` examples (fp32 on CPU).

Rows (each in a fresh process, so memory figures do not mix):

- one process: plain, activation checkpointing (``checkpoint_blocks``), per-block compile
  (``compile_blocks``), both;
- two processes (``torchrun``, gloo): DDP and FSDP2 (``parallelize``: the model built on
  ``meta``, sharded, then materialised, as torchtitan does), the same global batch.

Throughput is samples per second over ``--steps`` steps after one warm-up step (the compile
step excluded). Memory is each process's peak resident-set growth from just before the
model is built (sampled every 2 ms; parameters, gradients, AdamW's two moments and
activations). The FSDP2 / DDP ratio of per-process memory is the figure to watch: with two
processes the sharded states should take about half.

    python benchmarks/training.py                    # all rows, CPU
    python benchmarks/training.py --json benchmarks/results/training-cpu.json
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build():
    from vlakit import VLA
    from vlakit.core import BidirectionalMask
    from vlakit.decoders import llama
    from vlakit.heads import L1RegressionHead
    from vlakit.interleave import PrefixInterleaver
    from vlakit.projectors import LinearProjector
    from vlakit.vision import vit

    return VLA(
        encoder=vit(img_size=224, patch_size=14, dim=256, depth=2, num_heads=4, mlp_dim=1024),
        projector=LinearProjector(256, 1024),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=512, dim=1024, num_layers=8, num_heads=16, mlp_dim=2752),
        mask_policy=BidirectionalMask(),
        head=L1RegressionHead(1024, action_dim=7, chunk_size=8),
    )


def worker(mode: str, batch: int, steps: int) -> None:
    import torch
    import torch.distributed as dist

    distributed = mode in ("ddp", "fsdp")
    if distributed:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    torch.set_num_threads(1 if distributed else 2)
    from vlakit import VLAInputs
    from vlakit.core import init_parameters
    from vlakit.distributed import checkpoint_blocks, compile_blocks, parallelize

    base = peak = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    if mode == "fsdp":
        with torch.device("meta"):
            model = build()
        parallelize(model)
        model.to_empty(device="cpu")
        init_parameters(model)
    else:
        model = build()
        if "ac" in mode:
            checkpoint_blocks(model)
        if "compile" in mode:
            compile_blocks(model)
    params = sum(p.numel() for p in build().parameters()) if rank == 0 else 0
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
               if mode == "ddp" else model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    local = batch // world
    g = torch.Generator().manual_seed(rank)
    inputs = VLAInputs(input_ids=torch.randint(5, 500, (local, 14), generator=g),
                       text_valid=torch.ones(local, 14, dtype=torch.bool),
                       pixels=torch.rand(local, 2, 3, 224, 224, generator=g),
                       actions=torch.rand(local, 8, 7, generator=g) * 2 - 1)

    def step() -> None:
        wrapped(inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (compiles, allocates the optimiser's state)
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if distributed:
        dist.barrier()
    seconds = time.perf_counter() - start
    done.set()
    result = {"mode": mode, "rank": rank, "world": world, "params": params,
              "samples_per_s": batch * steps / seconds, "peak_bytes": max(peak, _rss()) - base}
    print("RESULT " + json.dumps(result), flush=True)
    if distributed:
        dist.destroy_process_group()


def run(mode: str, batch: int, steps: int) -> list[dict]:
    script = os.path.abspath(__file__)
    args = ["--worker", mode, "--batch", str(batch), "--steps", str(steps)]
    if mode in ("ddp", "fsdp"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", script, *args]
    else:
        command = [sys.executable, script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if mode in ("ddp", "fsdp") else "2"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines()
            if line.startswith("RESULT ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+",
                        default=["plain", "ac", "compile", "ac+compile", "ddp", "fsdp"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.batch, args.steps)
        return
    from _common import machine_name, print_table, write_json

    rows = []
    for mode in args.modes:
        results = run(mode, args.batch, args.steps)
        per_process = max(r["peak_bytes"] for r in results)
        rows.append({"mode": mode, "processes": results[0]["world"],
                     "samples_per_s": results[0]["samples_per_s"],
                     "peak_mib": per_process / 2**20,
                     "params": max(r["params"] for r in results)})
    plain = next((r for r in rows if r["mode"] == "plain"), rows[0])
    ddp = next((r for r in rows if r["mode"] == "ddp"), None)
    for row in rows:
        row["speed"] = row["samples_per_s"] / plain["samples_per_s"]
        row["memory"] = row["peak_mib"] / (ddp["peak_mib"] if ddp and row["mode"] == "fsdp"
                                           else plain["peak_mib"])
    print(f"machine: {machine_name('cpu')}; {rows[0]['params']:,} parameters; batch "
          f"{args.batch} (global); {args.steps} timed steps after one warm-up; fp32")
    print_table(rows, [("mode", "mode", "s"), ("processes", "processes", "d"),
                       ("samples_per_s", "samples/s", ".2f"), ("speed", "vs plain", ".2f"),
                       ("peak_mib", "peak MiB per process", ".0f"),
                       ("memory", "memory ratio", ".2f")])
    print("memory ratio: vs plain; for fsdp, vs ddp (per process, 2 processes each)")
    write_json(args.json, {"machine": machine_name("cpu"), "batch": args.batch,
                           "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
