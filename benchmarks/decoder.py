"""vlakit's TransformerDecoder vs transformers' LlamaForCausalLM on the same weights.

Forward latency, tokens/s and peak memory for a Llama-shaped decoder (default d=1024,
8 layers, 600-token sequences, batch 1 and 8), with the vlakit/transformers ratio.

    python benchmarks/decoder.py                       # fp32 on CPU
    python benchmarks/decoder.py --dtype bf16
    python benchmarks/decoder.py --device cuda --dtype bf16 --json out.json

Both models get the same embeddings, a causal mask and the same positions. transformers
gets the 2D attention mask it builds its own mask from; vlakit gets, per ``--masks``, the
mask spec a ``CausalMask`` policy gives for a right-padded sequence (``spec``: the decoder
takes SDPA's ``is_causal`` path) or the dense boolean ``[b, n, n]`` mask (``dense``).
Peak memory is the growth over one forward: allocator peak on CUDA;
on CPU, sampled resident-set growth in a child process whose glibc returns every large
block to the OS (see ``_common.cpu_memory_probe``).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    cpu_memory_probe,
    machine_name,
    measure_turns,
    peak_memory_mib,
    print_table,
    write_json,
)  # noqa: E402

from vlakit.convert import decoder_from_transformers  # noqa: E402
from vlakit.core import MaskSpec, causal_mask, positions_from_valid  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=600)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--masks", nargs="+", default=["spec", "dense"], choices=["spec", "dense"],
                   help="how vlakit receives the causal mask (one row per choice; all timed in "
                        "turns with transformers, 'vlakit vs dense mask' compares them)")
    p.add_argument("--json", default=None, help="write results to this path")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.dim,
        intermediate_size=args.dim * 11008 // 4096,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        attn_implementation=args.attn,
    )
    reference = LlamaForCausalLM(config).to(args.device, dtype).eval()
    ours = decoder_from_transformers(reference).eval()

    rows = []
    for b in args.batch_sizes:
        n = args.seq_len
        embeds = torch.randn(b, n, args.dim, device=args.device, dtype=dtype)
        valid = torch.ones(b, n, dtype=torch.bool, device=args.device)
        positions = positions_from_valid(valid)
        masks = {  # "spec": what CausalMask().spec(seq) gives for a right-padded sequence
            "spec": MaskSpec(torch.arange(n, device=args.device).expand(b, n), valid, True),
            "dense": causal_mask(valid),
        }
        attention_mask = valid.long()

        def run_ref(embeds=embeds, attention_mask=attention_mask, positions=positions):
            with torch.inference_mode():
                return reference.model(
                    inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions
                ).last_hidden_state

        def make_ours(mask, embeds=embeds, positions=positions):
            def run_ours(embeds=embeds, mask=mask, positions=positions):
                with torch.inference_mode():
                    return ours(embeds, mask, positions)

            return run_ours

        runs = {kind: make_ours(masks[kind]) for kind in args.masks}
        if args.memory_probe:  # child process: memory only (see cpu_memory_probe)
            kind = args.masks[0]
            print(json.dumps({"ours": peak_memory_mib(runs[kind], args.device),
                              "ref": peak_memory_mib(run_ref, args.device)}))
            return
        # every vlakit variant and transformers take turns run by run
        timed = measure_turns([*runs.values(), run_ref], args.device, args.warmup, args.repeats)
        r = timed[-1]
        dense_ms = dict(zip(runs, timed)).get("dense", {}).get("latency_ms", float("nan"))
        for kind, o in zip(runs, timed):
            max_diff = (runs[kind]().float() - run_ref().float()).abs().max().item()
            if args.device == "cpu":
                mem = cpu_memory_probe(
                    ["--batch-sizes", str(b), "--masks", kind, "--memory-probe"]
                )
                o["peak_mem_mib"], r["peak_mem_mib"] = mem["ours"], mem["ref"]
            rows.append(
                {
                    "batch": b,
                    "seq_len": n,
                    "mask": kind,
                    "vlakit_ms": o["latency_ms"],
                    "hf_ms": r["latency_ms"],
                    "latency_ratio": o["latency_ms"] / r["latency_ms"],
                    "vs_dense": o["latency_ms"] / dense_ms,
                    "vlakit_tok_s": b * n / o["latency_ms"] * 1000,
                    "hf_tok_s": b * n / r["latency_ms"] * 1000,
                    "vlakit_mem_mib": o["peak_mem_mib"],
                    "hf_mem_mib": r["peak_mem_mib"],
                    "mem_ratio": o["peak_mem_mib"] / max(r["peak_mem_mib"], 1e-9),
                    "max_abs_diff": max_diff,
                }
            )

    print(
        f"machine: {machine_name(args.device)}; torch {torch.__version__}; dtype {args.dtype}; "
        f"d={args.dim}, layers={args.layers}, heads={args.heads}, transformers attn={args.attn}"
    )
    print_table(
        rows,
        [
            ("batch", "batch", "d"),
            ("seq_len", "tokens", "d"),
            ("mask", "vlakit mask", "s"),
            ("vlakit_ms", "vlakit ms", ".1f"),
            ("hf_ms", "transformers ms", ".1f"),
            ("latency_ratio", "latency ratio", ".3f"),
            ("vs_dense", "vlakit vs dense mask", ".3f"),
            ("vlakit_tok_s", "vlakit tok/s", ".0f"),
            ("hf_tok_s", "transformers tok/s", ".0f"),
            ("vlakit_mem_mib", "vlakit peak MiB", ".1f"),
            ("hf_mem_mib", "transformers peak MiB", ".1f"),
            ("mem_ratio", "memory ratio", ".3f"),
            ("max_abs_diff", "max |diff|", ".1e"),
        ],
    )
    write_json(
        args.json,
        {
            "benchmark": "decoder",
            "machine": machine_name(args.device),
            "device": args.device,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "args": vars(args),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
