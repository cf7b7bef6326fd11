"""Vision encoders: vlakit's own ViT against timm on the same weights.

Two groups of models, each built once (every vlakit model is ``vit_from_timm`` of the
timm model it is compared with, so outputs must agree: see the ``max |diff|`` column):

``so400m`` (SigLIP So400m/14, 224 px, batch of 3-channel images)

- ``so400m full``: all 27 blocks + final norm (vlakit ``ViT.forward`` vs timm
  ``forward_features``).
- ``so400m @-2``: the second-to-last block, no norm, both stopping there (vlakit
  ``encode(layer=-2)``, the path of ``output_layer=-2``, vs timm
  ``forward_intermediates(stop_early=True)``). ``time saved vs full`` compares it with the
  same vlakit ViT run to the last block.

``fused`` (OpenVLA's DINOv2 ViT-L/14 reg4 + SigLIP So400m, 224 px, 6-channel input →
``[b, 256, 2176]`` from the second-to-last block of each tower)

- ``fused @-2 (OpenVLA call)``: timm called as OpenVLA's prismatic calls it,
  ``get_intermediate_layers(n={depth - 2})``, which runs every block.
- ``fused @-2 (stop_early)``: timm ``forward_intermediates(stop_early=True)``.

Latency: median of ``--runs`` timed forwards after ``--warmup`` untimed ones, under
``torch.inference_mode``; all functions of a group take turns run by run, so that load
from other processes falls on them alike. Peak memory (MiB): on CUDA
``torch.cuda.max_memory_allocated`` during one forward minus the memory allocated before
it (activations and workspace); on CPU the growth of the resident set's high-water mark
during one forward, in a fresh subprocess per group, after a warm-up forward, with the
mark reset through ``/proc/self/clear_refs`` (falls back to ``getrusage``, which then
includes the build, where that is refused) and large allocations served by ``mmap`` so
that freed tensors leave the resident set.

    python benchmarks/vision.py --batch-sizes 1     # CPU fp32: about 4 min on 2 cores
    python benchmarks/vision.py --device cuda --dtype bf16 --json vision.json
    python benchmarks/vision.py --quick             # tiny models, seconds
"""

import argparse
import gc
import json
import os
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_name  # noqa: E402

from vlakit.convert import vit_from_timm  # noqa: E402
from vlakit.vision import FusedEncoder  # noqa: E402


def dtypes() -> dict[str, torch.dtype]:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- models
def random_init_(model: torch.nn.Module) -> torch.nn.Module:
    """Cheap random weights in place (timm's own init of 700M parameters takes minutes on
    two cores): N(0, 0.02) matrices, LayerNorm weight 1 and bias 0, LayerScale 0.1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 1 and leaf == "weight":  # norms
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            elif leaf == "gamma":
                p.fill_(0.1)
            else:
                p.normal_(0.0, 0.02)
    return model


def timm_model(name: str, tiny: dict, quick: bool, device: str, **kwargs) -> VisionTransformer:
    """A timm ViT built on the meta device, allocated on ``device``, randomly filled."""
    with torch.device("meta"):
        model = VisionTransformer(**tiny) if quick else timm.create_model(name, **kwargs)
    return random_init_(model.to_empty(device=device)).eval()


def timm_siglip(quick: bool, device: str) -> VisionTransformer:
    tiny = dict(
        img_size=56,
        patch_size=14,
        embed_dim=96,
        depth=6,
        num_heads=4,
        class_token=False,
        global_pool="map",
        num_classes=0,
    )
    return timm_model("vit_so400m_patch14_siglip_224", tiny, quick, device, pretrained=False)


def timm_dino(quick: bool, device: str) -> VisionTransformer:
    tiny = dict(
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
    name = "vit_large_patch14_reg4_dinov2"
    return timm_model(name, tiny, quick, device, pretrained=False, img_size=224)


def build_group(group: str, quick: bool, device: str, dtype: torch.dtype) -> dict:
    """``{"channels": c, "fns": {name: fn(x)}, "rows": [(row, vlakit, timm, full)]}``."""
    if group == "so400m":
        ref = timm_siglip(quick, device).to(dtype)
        own = vit_from_timm(ref).eval()
        last = len(ref.blocks) - 1

        def timm_stop(x: torch.Tensor) -> torch.Tensor:
            return ref.forward_intermediates(
                x,
                indices=[last - 1],
                norm=False,
                stop_early=True,
                intermediates_only=True,
                output_fmt="NLC",
            )[0]

        def own_stop(x: torch.Tensor) -> torch.Tensor:  # == forward with output_layer=-2
            return own.encode(x, layer=-2)[:, own.num_prefix_tokens :]

        fns = {
            "vlakit": own,
            "timm": ref.forward_features,
            "vlakit@-2": own_stop,
            "timm@-2": timm_stop,
        }
        rows = [
            ("so400m full", "vlakit", "timm", None),
            ("so400m @-2", "vlakit@-2", "timm@-2", "vlakit"),
        ]
        return {"channels": 3, "fns": fns, "rows": rows}

    dino, siglip = timm_dino(quick, device).to(dtype), timm_siglip(quick, device).to(dtype)
    fused = FusedEncoder(
        [vit_from_timm(dino, output_layer=-2), vit_from_timm(siglip, output_layer=-2)]
    ).eval()
    n_dino, n_siglip = len(dino.blocks), len(siglip.blocks)

    def timm_all_blocks(x: torch.Tensor) -> torch.Tensor:  # prismatic's call
        a = dino.get_intermediate_layers(x[:, :3], n={n_dino - 2})[0]
        b = siglip.get_intermediate_layers(x[:, 3:], n={n_siglip - 2})[0]
        return torch.cat([a, b], dim=2)

    def timm_stop(x: torch.Tensor) -> torch.Tensor:
        kw = dict(norm=False, stop_early=True, intermediates_only=True, output_fmt="NLC")
        a = dino.forward_intermediates(x[:, :3], indices=[n_dino - 2], **kw)[0]
        b = siglip.forward_intermediates(x[:, 3:], indices=[n_siglip - 2], **kw)[0]
        return torch.cat([a, b], dim=2)

    fns = {"vlakit": fused, "timm OpenVLA call": timm_all_blocks, "timm stop_early": timm_stop}
    rows = [
        ("fused @-2 (OpenVLA call)", "vlakit", "timm OpenVLA call", None),
        ("fused @-2 (stop_early)", "vlakit", "timm stop_early", None),
    ]
    return {"channels": 6, "fns": fns, "rows": rows}


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
    """Median latency of each function; they take turns run by run (order reversed every
    other run)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name](x)
        sync(device)
        for i in range(runs):
            for name in names if i % 2 == 0 else names[::-1]:
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


def cpu_worker(group: str, batches: list[int], quick: bool, dtype_name: str) -> dict:
    """In a fresh process: build the group, then for every function and batch size one
    warm-up forward, reset the RSS high-water mark, one measured forward."""
    spec = build_group(group, quick, "cpu", dtypes()[dtype_name])
    peaks: dict[str, dict[str, float]] = {}
    method = "clear_refs"
    for name, fn in spec["fns"].items():
        for batch in batches:
            x = make_input(spec["channels"], batch, quick, "cpu", dtypes()[dtype_name])
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
            peaks.setdefault(name, {})[str(batch)] = max(peak - baseline, 0) / 1024
            del x
    return {"peak_mib": peaks, "method": method}


def cpu_peaks(group: str, batches: list[int], quick: bool, dtype_name: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_worker",
        group,
        ",".join(map(str, batches)),
        dtype_name,
    ] + (["--quick"] if quick else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(dtypes()))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--groups", default="so400m,fused", help="so400m and/or fused")
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        group, batch_list, dtype_name = args._worker
        batch_sizes = [int(b) for b in batch_list.split(",")]
        print(json.dumps(cpu_worker(group, batch_sizes, args.quick, dtype_name)))
        return

    if args.quick:  # tiny models: more repetitions against timer noise
        args.runs, args.warmup = max(args.runs, 20), max(args.warmup, 3)
    dtype = dtypes()[args.dtype]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    groups = [g.strip() for g in args.groups.split(",")]
    for group in groups:
        if group not in ("so400m", "fused"):
            raise SystemExit(f"unknown group {group!r}; choose so400m and/or fused")
    cuda = args.device.startswith("cuda")
    results = []
    for group in groups:
        spec = build_group(group, args.quick, args.device, dtype)
        fns = spec["fns"]
        for batch in batches:
            x = make_input(spec["channels"], batch, args.quick, args.device, dtype)
            ms = latencies_ms(fns, x, args.runs, args.warmup, args.device)
            mem = {n: cuda_peak_mib(f, x) for n, f in fns.items()} if cuda else {}
            with torch.inference_mode():
                outs = {n: f(x).float() for n, f in fns.items()}
            for row, ours, theirs, full in spec["rows"]:
                entry = {
                    "group": group,
                    "row": row,
                    "batch": batch,
                    "vlakit": ours,
                    "timm": theirs,
                    "vlakit_ms": ms[ours],
                    "timm_ms": ms[theirs],
                    "max_abs_diff": (outs[ours] - outs[theirs]).abs().max().item(),
                }
                entry["latency_ratio"] = entry["vlakit_ms"] / entry["timm_ms"]
                if full is not None:
                    entry["saved_vs_full"] = 1 - ms[ours] / ms[full]
                if mem:
                    entry["vlakit_mem_mib"], entry["timm_mem_mib"] = mem[ours], mem[theirs]
                results.append(entry)
                print(
                    f"  {row:26s} b={batch}: vlakit {ms[ours]:.1f} ms, timm {ms[theirs]:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            del x, outs
        del spec, fns
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        elif not args.no_memory:
            peaks = cpu_peaks(group, batches, args.quick, args.dtype)
            for entry in results:
                if entry["group"] == group:
                    for impl in ("vlakit", "timm"):
                        entry[f"{impl}_mem_mib"] = peaks["peak_mib"][entry[impl]][
                            str(entry["batch"])
                        ]
                    entry["mem_method"] = peaks["method"]
    for entry in results:
        if "vlakit_mem_mib" in entry and entry.get("timm_mem_mib"):
            entry["mem_ratio"] = entry["vlakit_mem_mib"] / entry["timm_mem_mib"]

    header = (
        f"machine: {machine_name(args.device)}; torch {torch.__version__}, "
        f"timm {timm.__version__}; "
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
