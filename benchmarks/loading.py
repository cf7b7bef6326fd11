"""Checkpoint loading: wall time and peak resident memory as a ratio to the checkpoint size,
vlakit's ``load_paligemma`` against transformers' ``from_pretrained`` on the same directory.

A synthetic PaliGemma checkpoint in the real layout (transformers' own ``save_pretrained``,
sharded bf16 safetensors) is written once: the real SigLIP So400m tower and projector, and
a Gemma-2B language model cut to ``--layers`` layers (full vocabulary 257216), about 2.9 GB
at the default 4 layers (``--layers 18`` is the full 5.8 GB PaliGemma-3B). Each load runs in
a fresh child process (so nothing is cached in the allocator), building the model and
loading every weight in bf16 on CPU; the child reports its peak resident set
(``ru_maxrss``, which counts the memory-mapped file pages it touched) minus the resident set
of a child that only imported the libraries. A ratio near 1.0 means the checkpoint's bytes
were resident once; 2.0 means held twice.

    python benchmarks/loading.py                       # writes /tmp/vlakit-loading-bench
    python benchmarks/loading.py --layers 1 --repeats 1 # quicker
    python benchmarks/loading.py --json benchmarks/results/loading-cpu.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_name, print_table, write_json  # noqa: E402


def _child(kind: str, path: str) -> None:
    import torch

    if kind == "baseline":
        import transformers  # noqa: F401

        import vlakit.models  # noqa: F401

        start = time.perf_counter()
    elif kind == "vlakit":
        from vlakit.models import load_paligemma

        start = time.perf_counter()
        model = load_paligemma(path, dtype=torch.bfloat16)
    else:
        from transformers import PaliGemmaForConditionalGeneration

        import vlakit.models  # noqa: F401  (the same imports as the other children)

        start = time.perf_counter()
        model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    params = 0 if kind == "baseline" else sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "params": params}))


def _run(kind: str, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, path], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_checkpoint(path: str, layers: int) -> int:
    import torch
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
    )

    marker = os.path.join(path, f"layers-{layers}")
    if not os.path.exists(marker):
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304,
                                    num_hidden_layers=27, num_attention_heads=16,
                                    image_size=224, patch_size=14, vision_use_head=False,
                                    projection_dim=2048, hidden_act="gelu_pytorch_tanh")
        text = GemmaConfig(vocab_size=257216, hidden_size=2048, intermediate_size=16384,
                           num_hidden_layers=layers, num_attention_heads=8,
                           num_key_value_heads=1, head_dim=256)
        config = PaliGemmaConfig(vision_config=vision, text_config=text,
                                 image_token_id=257152, projection_dim=2048)
        torch.set_default_dtype(torch.bfloat16)
        model = PaliGemmaForConditionalGeneration(config)
        model.save_pretrained(path, max_shard_size="1GB")
        del model
        open(marker, "w").close()
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default="/tmp/vlakit-loading-bench")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    path = os.path.join(args.dir, f"paligemma-{args.layers}-layers")
    os.makedirs(path, exist_ok=True)
    size = write_checkpoint(path, args.layers)
    baseline = min(_run("baseline", path)["peak_bytes"] for _ in range(args.repeats))
    rows = []
    for kind in ("vlakit", "transformers"):
        runs = [_run(kind, path) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        peak = min(r["peak_bytes"] for r in runs) - baseline
        rows.append({"loader": "vlakit load_paligemma" if kind == "vlakit" else
                     "transformers from_pretrained", "params": best["params"],
                     "seconds": best["seconds"], "peak_gib": peak / 2**30,
                     "ratio": peak / size})
    for row in rows:
        row["time_ratio"] = row["seconds"] / rows[1]["seconds"]
    print(f"machine: {machine_name('cpu')}; checkpoint {size / 2**30:.2f} GiB bf16 in "
          f"{path}; Gemma layers {args.layers}; best of {args.repeats} fresh processes; "
          f"baseline resident set {baseline / 2**30:.2f} GiB subtracted")
    print_table(rows, [("loader", "loader", "s"), ("params", "parameters", ",d"),
                       ("seconds", "load s", ".1f"), ("time_ratio", "time vs transformers",
                                                      ".2f"),
                       ("peak_gib", "peak RSS GiB", ".2f"), ("ratio", "peak / checkpoint",
                                                             ".2f")])
    write_json(args.json, {"machine": machine_name("cpu"), "checkpoint_bytes": size,
                           "layers": args.layers, "rows": rows})


if __name__ == "__main__":
    main()
