"""Checkpoint loading: wall time and peak resident memory as a ratio to the checkpoint size,
vlakit's ``load_paligemma`` against transformers' ``from_pretrained`` on the same directory.

A synthetic PaliGemma checkpoint in the real layout (transformers' own ``save_pretrained``,
sharded bf16 safetensors) is written once: the real SigLIP So400m tower and projector, and
a Gemma-2B language model cut to ``--layers`` layers (full vocabulary 257216), about 2.9 GB
at the default 4 layers (``--layers 18`` is the full 5.8 GB PaliGemma-3B). Each load runs in
a fresh child process (so nothing is cached in the allocator), building the model and
loading every weight in bf16 on CPU, then touching one byte per page of every parameter
(what a first forward does: memory-mapped weights become resident). A sampler thread
records the child's resident set (``/proc/self/statm``, file-backed pages included) from
just before the load to the end; the table gives its peak growth and the growth left
after, as ratios to the checkpoint's size: 1.0 means its bytes were resident once, 2.0
twice. Time: the load call alone, and until every page was touched.

    python benchmarks/loading.py                       # writes /tmp/vlakit-loading-bench
    python benchmarks/loading.py --layers 1 --repeats 1 # quicker
    python benchmarks/loading.py --json benchmarks/results/loading-cpu.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_name, print_table, write_json  # noqa: E402


def _child(kind: str, path: str) -> None:
    import torch
    import transformers  # noqa: F401  (every child imports the same libraries)
    from _common import _RssSampler

    import vlakit.models  # noqa: F401

    with _RssSampler() as sampler:  # resident set from just before the load
        start = time.perf_counter()
        if kind == "vlakit":
            from vlakit.models import load_paligemma

            model = load_paligemma(path, dtype=torch.bfloat16)
        else:
            from transformers import PaliGemmaForConditionalGeneration

            model = PaliGemmaForConditionalGeneration.from_pretrained(path,
                                                                      dtype=torch.bfloat16)
        loaded = time.perf_counter() - start
        # touch one byte per page of every parameter: memory-mapped weights become resident
        # (what the first forward would do); the same for both loaders
        with torch.no_grad():
            for param in model.parameters():
                param.detach().reshape(-1).view(torch.uint8)[::4096].sum()
        touched = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"load_seconds": loaded, "ready_seconds": touched,
                      "peak_bytes": sampler.growth, "resident_bytes": sampler.final_growth,
                      "params": params}))


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
    rows = []
    for kind in ("vlakit", "transformers"):
        runs = [_run(kind, path) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["ready_seconds"])
        rows.append({
            "loader": "vlakit load_paligemma" if kind == "vlakit" else
            "transformers from_pretrained", "params": best["params"],
            "load_s": best["load_seconds"], "ready_s": best["ready_seconds"],
            "peak_gib": min(r["peak_bytes"] for r in runs) / 2**30,
            "ratio": min(r["peak_bytes"] for r in runs) / size,
            "resident_ratio": min(r["resident_bytes"] for r in runs) / size,
        })
    for row in rows:
        row["time_ratio"] = row["ready_s"] / rows[1]["ready_s"]
    print(f"machine: {machine_name('cpu')}; checkpoint {size / 2**30:.2f} GiB bf16 in "
          f"{path}; Gemma layers {args.layers}; best of {args.repeats} fresh processes")
    print_table(rows, [("loader", "loader", "s"), ("params", "parameters", ",d"),
                       ("load_s", "load s", ".2f"), ("ready_s", "+ pages touched s", ".2f"),
                       ("time_ratio", "time vs transformers", ".2f"),
                       ("peak_gib", "peak RSS growth GiB", ".2f"),
                       ("ratio", "peak / checkpoint", ".2f"),
                       ("resident_ratio", "after / checkpoint", ".2f")])
    write_json(args.json, {"machine": machine_name("cpu"), "checkpoint_bytes": size,
                           "layers": args.layers, "rows": rows})


if __name__ == "__main__":
    main()
