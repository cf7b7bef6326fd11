"""Vision encoders: vlakit's own ViT against timm on the same weights.

Rows (each vlakit model is ``ViT.from_timm`` of the timm model it is compared with):

- ``so400m full``: SigLIP So400m/14 at 224 px, all 27 blocks + final norm
  (vlakit ``ViT.forward`` vs timm ``forward_features``).
- ``so400m @-2``: the second-to-last block, no norm; both stop there (vlakit
  ``output_layer=-2`` vs timm ``forward_intermediates(stop_early=True)``). The
  ``time saved vs full`` column compares with the same vlakit ViT run to the last block
  (timed in the same loop).
- ``fused @-2 (OpenVLA call)``: DINOv2 ViT-L/14 reg4 + SigLIP So400m at 224 px,
  second-to-last block, 6-channel input → ``[b, 256, 2176]``; timm is called as OpenVLA's
  prismatic calls it (``get_intermediate_layers(n={depth - 2})``, which runs every block).
- ``fused @-2 (stop_early)``: the same, timm with ``forward_intermediates(stop_early=True)``.

Latency is the median of ``--runs`` timed forwards after ``--warmup`` untimed ones, under
``torch.inference_mode``; the implementations take turns run by run, so that load from
other processes falls on both alike. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during
one forward, minus the memory allocated before it (activations and workspace); on CPU the
growth of the peak resident set during one forward, measured in a fresh subprocess per
(row, implementation, batch) with the high-water mark reset after the model is built
(``/proc/self/clear_refs``; falls back to ``getrusage`` where that is refused, which then
includes the build). Memory is in MiB.

    python benchmarks/vision.py --batch-sizes 1            # CPU fp32: a few minutes on 2 cores
    python benchmarks/vision.py --device cuda --dtype bf16 --json vision.json
    python benchmarks/vision.py --quick                    # tiny models, seconds
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vlakit.vision import FusedEncoder, ViT  # noqa: E402

ROWS = ("so400m full", "so400m @-2", "fused @-2 (OpenVLA call)", "fused @-2 (stop_early)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- models
def timm_siglip(quick: bool) -> VisionTransformer:
    if quick:
        return VisionTransformer(
            img_size=56,
            patch_size=14,
            embed_dim=96,
            depth=6,
            num_heads=4,
            class_token=False,
            global_pool="map",
            num_classes=0,
        )
    return timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False)


def timm_dino(quick: bool) -> VisionTransformer:
    if quick:
        return VisionTransformer(
            img_size=56,
            patch_size=14,
            embed_dim=64,
            depth=6,
            num_heads=4,
            reg_tokens=4,
            no_embed_class=True,
            init_values=1e-5,
            num_classes=0,
        )
    return timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, img_size=224)


def build(row: str, quick: bool, device: str, dtype: torch.dtype) -> dict:
    """Models and input makers for one row: {'vlakit': fn(x), 'timm': fn(x), 'channels': c}."""

    def prep(m: torch.nn.Module) -> torch.nn.Module:
        return m.eval().to(device=device, dtype=dtype)

    if row.startswith("so400m"):
        ref = prep(timm_siglip(quick))
        own = prep(ViT.from_timm(ref))
        depth = len(ref.blocks)
        if row == "so400m full":
            return dict(channels=3, vlakit=own, timm=ref.forward_features)
        own.set_output_layer(-2)

        def timm_stop(x: torch.Tensor) -> torch.Tensor:
            return ref.forward_intermediates(
                x,
                indices=[depth - 2],
                norm=False,
                stop_early=True,
                intermediates_only=True,
                output_fmt="NLC",
            )[0]

        def own_full(x: torch.Tensor) -> torch.Tensor:  # the same ViT, all blocks + norm
            return own.encode(x, layer=-1)

        return dict(channels=3, vlakit=own, timm=timm_stop, vlakit_full=own_full)

    dino, siglip = prep(timm_dino(quick)), prep(timm_siglip(quick))
    fused = prep(
        FusedEncoder([ViT.from_timm(dino, output_layer=-2), ViT.from_timm(siglip, output_layer=-2)])
    )
    n_dino, n_siglip = len(dino.blocks), len(siglip.blocks)
    if row == "fused @-2 (OpenVLA call)":

        def timm_pair(x: torch.Tensor) -> torch.Tensor:  # prismatic: all blocks run
            a = dino.get_intermediate_layers(x[:, :3], n={n_dino - 2})[0]
            b = siglip.get_intermediate_layers(x[:, 3:], n={n_siglip - 2})[0]
            return torch.cat([a, b], dim=2)
    else:

        def timm_pair(x: torch.Tensor) -> torch.Tensor:
            kw = dict(norm=False, stop_early=True, intermediates_only=True, output_fmt="NLC")
            a = dino.forward_intermediates(x[:, :3], indices=[n_dino - 2], **kw)[0]
            b = siglip.forward_intermediates(x[:, 3:], indices=[n_siglip - 2], **kw)[0]
            return torch.cat([a, b], dim=2)

    return dict(channels=6, vlakit=fused, timm=timm_pair)


def make_input(channels: int, batch: int, quick: bool, device: str, dtype: torch.dtype):
    size = 56 if quick else 224
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, size, size, generator=gen).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- measurement
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def latencies_ms(
    fns: dict[str, Callable], x: torch.Tensor, runs: int, warmup: int, device: str
) -> dict[str, float]:
    """Median latency of each function; the functions alternate run by run (in turn-taking
    order), so that load from other processes falls on all of them alike."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name](x)
        sync(device)
        for i in range(runs):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                start = time.perf_counter()
                fns[name](x)
                sync(device)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def cuda_peak_mib(fn: Callable, x: torch.Tensor) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        fn(x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_worker(row: str, impl: str, batches: list[int], quick: bool, dtype_name: str) -> dict:
    """Run in a fresh process: build, then per batch size one warm-up forward, reset the
    RSS high-water mark, one measured forward."""
    dtype = DTYPES[dtype_name]
    spec = build(row, quick, "cpu", dtype)
    fn = spec[impl]  # holds only the models this implementation needs
    del spec
    gc.collect()
    peaks = {}
    method = "clear_refs"
    for batch in batches:
        x = make_input(6 if row.startswith("fused") else 3, batch, quick, "cpu", dtype)
        with torch.inference_mode():
            fn(x)  # warm-up: lazy initialisation is not the forward's memory
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            baseline = _proc_status_kib("VmRSS") or 0
        except OSError:
            method, baseline = "getrusage (includes the build)", 0
        with torch.inference_mode():
            fn(x)
        if method == "clear_refs":
            peak = _proc_status_kib("VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peaks[str(batch)] = max(peak - baseline, 0) / 1024
        del x
    return {"peak_mib": peaks, "method": method}


def cpu_peak_mib(row: str, impl: str, batches: list[int], quick: bool, dtype_name: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_worker",
        row,
        impl,
        ",".join(map(str, batches)),
        dtype_name,
    ] + (["--quick"] if quick else [])
    # large allocations through mmap, so that freed tensors leave the resident set at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main
def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of rows")
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        row, impl, batch_list, dtype_name = args._worker
        batch_sizes = [int(b) for b in batch_list.split(",")]
        print(json.dumps(cpu_worker(row, impl, batch_sizes, args.quick, dtype_name)))
        return

    if args.quick:  # tiny models: more repetitions against timer noise
        args.runs, args.warmup = max(args.runs, 20), max(args.warmup, 3)
    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows = [r.strip() for r in args.rows.split(",")]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {ROWS}")
    results = []
    for row in rows:
        spec = build(row, args.quick, args.device, dtype)
        for batch in batches:
            x = make_input(spec["channels"], batch, args.quick, args.device, dtype)
            with torch.inference_mode():
                diff = (spec["vlakit"](x).float() - spec["timm"](x).float()).abs().max().item()
            entry = {"row": row, "batch": batch, "max_abs_diff": diff}
            fns = {impl: spec[impl] for impl in ("vlakit", "timm", "vlakit_full") if impl in spec}
            for impl, ms in latencies_ms(fns, x, args.runs, args.warmup, args.device).items():
                entry[f"{impl}_ms"] = ms
            if "vlakit_full_ms" in entry:
                entry["saved_vs_full"] = 1 - entry["vlakit_ms"] / entry.pop("vlakit_full_ms")
            if args.device.startswith("cuda") and not args.no_memory:
                for impl in ("vlakit", "timm"):
                    entry[f"{impl}_mem_mib"] = cuda_peak_mib(spec[impl], x)
            entry["latency_ratio"] = entry["vlakit_ms"] / entry["timm_ms"]
            results.append(entry)
            print(
                f"  {row:26s} b={batch}: vlakit {entry['vlakit_ms']:.1f} ms, "
                f"timm {entry['timm_ms']:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
        del spec, x
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    if not args.device.startswith("cuda") and not args.no_memory:
        for row in rows:
            for impl in ("vlakit", "timm"):
                mem = cpu_peak_mib(row, impl, batches, args.quick, args.dtype)
                for entry in results:
                    if entry["row"] == row:
                        entry[f"{impl}_mem_mib"] = mem["peak_mib"][str(entry["batch"])]
                        entry["mem_method"] = mem["method"]
    for entry in results:
        if "vlakit_mem_mib" in entry and entry.get("timm_mem_mib"):
            entry["mem_ratio"] = entry["vlakit_mem_mib"] / entry["timm_mem_mib"]

    header = (
        f"machine: {machine(args.device)}; torch {torch.__version__}, timm {timm.__version__}; "
        f"{args.device} {args.dtype}; median of {args.runs} after {args.warmup} warmup"
        + ("; QUICK (tiny models)" if args.quick else "")
    )
    print(header)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "results": results}, f, indent=2)


def table(results: list[dict]) -> str:
    cols = [
        ("row", "row", "s"),
        ("batch", "batch", "d"),
        ("vlakit_ms", "vlakit ms", ".1f"),
        ("timm_ms", "timm ms", ".1f"),
        ("latency_ratio", "vlakit/timm", ".3f"),
        ("saved_vs_full", "time saved vs full", ".1%"),
        ("vlakit_mem_mib", "vlakit peak MiB", ".1f"),
        ("timm_mem_mib", "timm peak MiB", ".1f"),
        ("mem_ratio", "mem vlakit/timm", ".3f"),
        ("max_abs_diff", "max |diff|", ".1e"),
    ]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for e in results:
        cells = [format(e[k], f) if e.get(k) is not None else "" for k, _, f in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
