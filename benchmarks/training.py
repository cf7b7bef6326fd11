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

On a GPU (``--device cuda``, one process per row; DDP and FSDP2 rows need two processes and
run on CPU only here): the model is built on the GPU in ``--dtype``, memory is the CUDA
allocator's peak over the run (parameters, gradients, AdamW's moments, activations), and
the table adds decoder tokens/s and MFU: ``6 N`` FLOPs per token (``N`` every parameter)
plus ``12 L d n`` for attention scores, against ``--peak-tflops`` (default 989: H100 SXM
dense bf16). ``--dim/--layers/--heads/--mlp-dim/--vocab`` size the decoder; a ~1 B
assembly (0.98 B parameters, 592 tokens):

    python benchmarks/training.py --device cuda --dtype bf16 --dim 2048 --layers 16 \
        --heads 16 --mlp-dim 5504 --vocab 32000 --batch 8 --steps 5 --modes plain compile

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


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SIZE_DEFAULTS = {"dim": 1024, "layers": 8, "heads": 16, "mlp_dim": 2752, "vocab": 512}


def build(dim: int = 1024, layers: int = 8, heads: int = 16, mlp_dim: int = 2752,
          vocab: int = 512):
    from vlakit import VLA
    from vlakit.core import BidirectionalMask
    from vlakit.decoders import llama
    from vlakit.heads import L1RegressionHead
    from vlakit.interleave import PrefixInterleaver
    from vlakit.projectors import LinearProjector
    from vlakit.vision import vit

    return VLA(
        encoder=vit(img_size=224, patch_size=14, dim=256, depth=2, num_heads=4, mlp_dim=1024),
        projector=LinearProjector(256, dim),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=heads,
                      mlp_dim=mlp_dim),
        mask_policy=BidirectionalMask(),
        head=L1RegressionHead(dim, action_dim=7, chunk_size=8),
    )


def worker(mode: str, batch: int, steps: int, device: str = "cpu", dtype_name: str = "fp32",
           size: dict | None = None) -> None:
    import torch
    import torch.distributed as dist

    from vlakit.core import building

    size = SIZE_DEFAULTS if size is None else size
    dtype = getattr(torch, DTYPES[dtype_name])
    cuda = device.startswith("cuda")
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
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    if mode == "fsdp":
        with building(dtype, "meta"):
            model = build(**size)
        parallelize(model)
        model.to_empty(device="cpu")
        init_parameters(model)
    else:
        with building(dtype, device):  # built on the device, in dtype (no fp32 copy first)
            model = build(**size)
        if "ac" in mode:
            checkpoint_blocks(model)
        if "compile" in mode:
            compile_blocks(model)
    with torch.device("meta"):  # counted on meta: FSDP2's shards hold a part each
        params = sum(p.numel() for p in build(**size).parameters()) if rank == 0 else 0
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
               if mode == "ddp" else model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    local = batch // world
    g = torch.Generator().manual_seed(rank)
    vocab = size["vocab"]
    inputs = VLAInputs(input_ids=torch.randint(5, min(500, vocab), (local, 14), generator=g),
                       text_valid=torch.ones(local, 14, dtype=torch.bool),
                       pixels=torch.rand(local, 2, 3, 224, 224, generator=g),
                       actions=torch.rand(local, 8, 7, generator=g) * 2 - 1).to(device)
    tokens = []

    def step() -> None:
        out = wrapped(inputs)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not tokens:
            tokens.append(out.hidden.shape[1])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (compiles, allocates the optimiser's state)
    if distributed:
        dist.barrier()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if distributed:
        dist.barrier()
    sync()
    seconds = time.perf_counter() - start
    done.set()
    peak_bytes = max(peak, _rss()) - base
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated() - cuda_base
    result = {"mode": mode, "rank": rank, "world": world, "params": params,
              "samples_per_s": batch * steps / seconds, "peak_bytes": peak_bytes,
              "seq_len": tokens[0], "device": device, "dtype": dtype_name}
    print("RESULT " + json.dumps(result), flush=True)
    if distributed:
        dist.destroy_process_group()


def run(mode: str, batch: int, steps: int, extra: list[str] | None = None) -> list[dict]:
    script = os.path.abspath(__file__)
    args = ["--worker", mode, "--batch", str(batch), "--steps", str(steps), *(extra or [])]
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
    parser.add_argument("--modes", nargs="+", default=None,
                        choices=["plain", "ac", "compile", "ac+compile", "ddp", "fsdp"],
                        help="default: all six on CPU; plain, ac, compile, ac+compile on cuda")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--dim", type=int, default=SIZE_DEFAULTS["dim"])
    parser.add_argument("--layers", type=int, default=SIZE_DEFAULTS["layers"])
    parser.add_argument("--heads", type=int, default=SIZE_DEFAULTS["heads"])
    parser.add_argument("--mlp-dim", type=int, default=SIZE_DEFAULTS["mlp_dim"])
    parser.add_argument("--vocab", type=int, default=SIZE_DEFAULTS["vocab"])
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the accelerator's dense peak for --dtype, for MFU (cuda only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    size = {"dim": args.dim, "layers": args.layers, "heads": args.heads,
            "mlp_dim": args.mlp_dim, "vocab": args.vocab}
    cuda = args.device.startswith("cuda")
    if args.worker:
        worker(args.worker, args.batch, args.steps, args.device, args.dtype, size)
        return
    from _common import machine_name, print_table, write_json

    if args.modes is None:
        args.modes = ["plain", "ac", "compile", "ac+compile"] + ([] if cuda else ["ddp", "fsdp"])
    if cuda and {"ddp", "fsdp"} & set(args.modes):
        parser.error("ddp and fsdp run two processes on CPU (gloo); on cuda use the "
                     "single-process modes")
    extra = ["--device", args.device, "--dtype", args.dtype, "--dim", str(args.dim),
             "--layers", str(args.layers), "--heads", str(args.heads),
             "--mlp-dim", str(args.mlp_dim), "--vocab", str(args.vocab)]
    rows, failures = [], {}
    for mode in args.modes:
        try:
            results = run(mode, args.batch, args.steps, extra)
        except subprocess.CalledProcessError as exc:  # one failing row does not lose the rest
            tail = (exc.stderr or "").strip().splitlines()[-15:]
            failures[mode] = tail[-1] if tail else f"exit status {exc.returncode}"
            print(f"mode {mode} failed:\n" + "\n".join(tail), file=sys.stderr, flush=True)
            continue
        per_process = max(r["peak_bytes"] for r in results)
        params = max(r["params"] for r in results)
        seq = results[0]["seq_len"]
        samples = results[0]["samples_per_s"]
        # 6 N per token (forward + backward), plus attention scores 12 L d n
        flops_per_token = 6 * params + 12 * args.layers * args.dim * seq
        tokens_per_s = samples * seq
        rows.append({"mode": mode, "processes": results[0]["world"],
                     "samples_per_s": samples, "tokens_per_s": tokens_per_s,
                     "seq_len": seq, "tflops": tokens_per_s * flops_per_token / 1e12,
                     "mfu": (tokens_per_s * flops_per_token / (args.peak_tflops * 1e12)
                             if cuda else float("nan")),
                     "peak_mib": per_process / 2**20, "params": params})
    if not rows:
        raise SystemExit(f"every mode failed: {failures}")
    plain = next((r for r in rows if r["mode"] == "plain"), rows[0])
    ddp = next((r for r in rows if r["mode"] == "ddp"), None)
    for row in rows:
        row["speed"] = row["samples_per_s"] / plain["samples_per_s"]
        row["memory"] = row["peak_mib"] / (ddp["peak_mib"] if ddp and row["mode"] == "fsdp"
                                           else plain["peak_mib"])
    machine = machine_name(args.device)
    print(f"machine: {machine}; {rows[0]['params']:,} parameters; {rows[0]['seq_len']} tokens; "
          f"batch {args.batch} (global); {args.steps} timed steps after one warm-up; "
          f"{args.device} {args.dtype}")
    columns = [("mode", "mode", "s"), ("processes", "processes", "d"),
               ("samples_per_s", "samples/s", ".2f"), ("tokens_per_s", "tokens/s", ".0f"),
               ("speed", "vs plain", ".2f")]
    if cuda:
        columns += [("tflops", "model TFLOP/s", ".1f"), ("mfu", "MFU", ".1%")]
    columns += [("peak_mib", "peak MiB per process", ".0f"), ("memory", "memory ratio", ".2f")]
    print_table(rows, columns)
    print("memory ratio: vs plain; for fsdp, vs ddp (per process, 2 processes each)"
          + (f"; MFU against {args.peak_tflops:g} TFLOP/s" if cuda else ""))
    for mode, error in failures.items():
        print(f"FAILED {mode}: {error}")
    write_json(args.json, {"machine": machine, "device": args.device, "dtype": args.dtype,
                           "size": size, "batch": args.batch, "steps": args.steps,
                           "peak_tflops": args.peak_tflops if cuda else None, "rows": rows,
                           "failures": failures})


if __name__ == "__main__":
    main()
