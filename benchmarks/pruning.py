"""Token pruning: decoder latency and FLOPs with and without a pruner, side by side.

Full width, reduced depth so that it fits a CPU: a Llama-shaped vlakit decoder with
d = 4096, 32 heads, MLP 11008 (Llama-2-7B's layer) and ``--layers`` layers (4 by default;
``--layers 32`` is the whole Llama-2-7B). The sequence is OpenVLA-OFT's with two views:
``<s>``, 512 image tokens, one proprio token, 22 prompt tokens and 56 action slots (80
tokens besides the images), random embeddings, under OFT's bidirectional mask. The image
tokens are drawn around 48 random centres (neighbouring patches of real images are alike;
on i.i.d. random tokens LightVLA's queries pick themselves and it keeps almost all 512):
on these it keeps about 100 of 512, near the ~78 a trained LightVLA keeps on LIBERO.

Rows (all in one run, timed in turns so that load from other processes falls on them
alike): no pruning; ``TopKPruner`` forced to keep 50 %, 25 % and 15 % of the image tokens;
``LightVLAPruner`` at evaluation (its own, variable choice: on random weights it is not the
~15 % of a trained model, so the row shows its own cost at the count it picked). Each
timed call is the pruner *and* the decoder (as ``model.runner(inputs).run_decoder(seq)``
runs a pruner before layer 0: prune the embeddings, rebuild the mask, run every layer), so
the pruner's own cost is included; the pruner alone is timed too, and so is the decoder with
an attention tap on layer 0 (FastV's read).

FLOPs are counted analytically (multiply-adds x 2): per layer ``2 n (4 d^2 + 3 d m)`` for
the projections and MLP plus ``4 n^2 d`` for attention; the LightVLA scorer adds
``4 p n d + 2 p^2 d``. The goal (issue 10): the measured latency reduction is at least 0.8
of the FLOP reduction (``ratio`` column).

    python benchmarks/pruning.py                         # CPU fp32, batch 1 and 4
    python benchmarks/pruning.py --batch 1 --repeats 2   # quicker
    python benchmarks/pruning.py --json benchmarks/results/pruning-cpu.json \\
        --plot benchmarks/results/pruning-cpu.png
    python benchmarks/pruning.py --device cuda --dtype bfloat16 --layers 32 --compile  # a GPU
    python benchmarks/pruning.py --plot-from benchmarks/results/pruning-cpu.json \
        --plot benchmarks/results/pruning-cpu.png          # redraw only
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_name, measure_turns, print_table, write_json  # noqa: E402

from vlakit.core import AttentionTap, BidirectionalMask, TokenRole, TokenSequence  # noqa: E402
from vlakit.decoders import llama  # noqa: E402
from vlakit.pruners import LightVLAPruner, TopKPruner  # noqa: E402

D, HEADS, MLP = 4096, 32, 11008
IMAGES, PROPRIO, PROMPT, SLOTS = 512, 1, 22, 56


def sequence(batch: int, dtype: torch.dtype, device: str) -> TokenSequence:
    roles = ([TokenRole.BOS] + [TokenRole.IMAGE] * IMAGES + [TokenRole.PROPRIO] * PROPRIO
             + [TokenRole.TEXT] * PROMPT + [TokenRole.ACTION] * SLOTS)
    n = len(roles)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, n, D, generator=g) * 0.02
    centres = torch.randn(batch, 48, D, generator=g) * 0.02
    which = torch.randint(0, 48, (IMAGES,), generator=g)
    embeds[:, 1:1 + IMAGES] = centres[:, which] + 0.1 * torch.randn(batch, IMAGES, D,
                                                                   generator=g) * 0.02
    embeds = embeds.to(device, dtype)
    role_ids = torch.tensor([int(r) for r in roles], device=device).expand(batch, n)
    return TokenSequence(
        embeds=embeds, roles=role_ids.clone(),
        positions=torch.arange(n, device=device).expand(batch, n).clone(),
        valid=torch.ones(batch, n, dtype=torch.bool, device=device),
        is_suffix=role_ids == int(TokenRole.ACTION),
        token_ids=torch.full((batch, n), -100, device=device),
        right_padded=True, num_image_tokens=IMAGES,
    )


def decoder_flops(batch: int, n: int, layers: int) -> float:
    per_layer = 2 * n * (4 * D * D + 3 * D * MLP) + 4 * n * n * D
    return batch * layers * per_layer


def lightvla_flops(batch: int, n: int) -> float:
    return batch * (4 * IMAGES * n * D + 2 * IMAGES * IMAGES * D)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    parser.add_argument("--length-multiple", type=int, default=None,
                        help="LightVLAPruner(length_multiple=...): round its pruned length up "
                             "to a multiple of this (fewer shapes for a compiled decoder)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="PNG of latency against kept tokens")
    parser.add_argument("--plot-from", default=None, help="only redraw --plot from this JSON")
    args = parser.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            saved = json.load(f)
        plot(saved["rows"], args.plot, f"{saved['layers']} layers at d={D}, {saved['dtype']}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    decoder = llama(vocab_size=256, dim=D, num_layers=args.layers, num_heads=HEADS,
                    mlp_dim=MLP, dtype=dtype, device=args.device).eval()
    run_decoder = torch.compile(decoder, fullgraph=True, dynamic=True) if args.compile else decoder
    policy = BidirectionalMask()
    pruners = [("none", None)] + [
        (f"TopK {int(r * 100)} %", TopKPruner(r)) for r in (0.5, 0.25, 0.15)
    ] + [("LightVLA (own choice)", LightVLAPruner(length_multiple=args.length_multiple))]
    rows, points, taps = [], [], []
    for batch in args.batch:
        seq = sequence(batch, dtype, args.device)

        def call(pruner, seq=seq):
            def fn():
                with torch.no_grad():
                    s = seq if pruner is None else pruner.eval()(seq)
                    return run_decoder(s.embeds, policy.spec(s), s.positions)
            return fn

        def prune_only(pruner, seq=seq):
            def fn():
                with torch.no_grad():
                    return pruner.eval()(seq)
            return fn

        fns = [call(p) for _, p in pruners]
        timed = measure_turns(fns, args.device, args.warmup, args.repeats, memory=False)
        alone = measure_turns([prune_only(p) for _, p in pruners[1:]], args.device, 1,
                              args.repeats, memory=False)
        base_ms, base_flops = timed[0]["latency_ms"], decoder_flops(batch, seq.length,
                                                                     args.layers)
        # the attention tap's cost: one query per row (FastV's last prompt token) on layer 0
        last = torch.full((batch, 1), seq.length - 1 - SLOTS, device=args.device)

        def plain(seq=seq):
            with torch.no_grad():
                return run_decoder(seq.embeds, policy.spec(seq), seq.positions)

        def tapped(seq=seq, last=last):
            with torch.no_grad():
                tap = AttentionTap(0, last)
                return run_decoder(seq.embeds, policy.spec(seq), seq.positions, tap=tap)

        untapped, with_tap = measure_turns([plain, tapped], args.device, args.warmup,
                                           args.repeats, memory=False)
        taps.append({"batch": batch, "plain_ms": untapped["latency_ms"],
                     "tap_ms": with_tap["latency_ms"],
                     "overhead": with_tap["latency_ms"] / untapped["latency_ms"] - 1})
        for i, ((name, pruner), t) in enumerate(zip(pruners, timed)):
            with torch.no_grad():
                pruned = seq if pruner is None else pruner.eval()(seq)
            kept = IMAGES if pruner is None else int(pruner.last_kept.sum(1).float().mean())
            n = pruned.length
            flops = decoder_flops(batch, n, args.layers)
            if isinstance(pruner, LightVLAPruner):
                flops += lightvla_flops(batch, seq.length)
            lat_red = 1 - t["latency_ms"] / base_ms
            flop_red = 1 - flops / base_flops
            row = {
                "batch": batch, "pruner": name, "kept": kept, "tokens": n,
                "latency_ms": t["latency_ms"], "pruner_ms": 0.0 if i == 0 else
                alone[i - 1]["latency_ms"], "gflops": flops / 1e9,
                "latency_reduction": lat_red, "flop_reduction": flop_red,
                # the goal's ratio, where there is a reduction to speak of
                "ratio": lat_red / flop_red if flop_red > 0.05 else float("nan"),
            }
            rows.append(row)
            points.append((batch, name, kept, t["latency_ms"]))
    print(f"machine: {machine_name(args.device)}; torch {torch.__version__}; {args.dtype}; "
          f"d={D}, {HEADS} heads, MLP {MLP}, {args.layers} layers; {IMAGES} image + "
          f"{1 + PROPRIO + PROMPT + SLOTS} other tokens; BidirectionalMask; median of "
          f"{args.repeats}")
    print_table(rows, [
        ("batch", "batch", "d"), ("pruner", "pruner", "s"), ("kept", "image kept", "d"),
        ("tokens", "tokens", "d"), ("latency_ms", "latency ms", ".1f"),
        ("pruner_ms", "pruner ms", ".2f"), ("gflops", "GFLOPs", ".0f"),
        ("flop_reduction", "FLOPs -", ".1%"), ("latency_reduction", "latency -", ".1%"),
        ("ratio", "ratio", ".2f"),
    ])
    print("\nattention tap (layer 0, one query per row) vs the same decoder without it:")
    print_table(taps, [("batch", "batch", "d"), ("plain_ms", "no tap ms", ".1f"),
                       ("tap_ms", "tap ms", ".1f"), ("overhead", "overhead", "+.2%")])
    write_json(args.json, {
        "machine": machine_name(args.device), "torch": torch.__version__, "dtype": args.dtype,
        "layers": args.layers, "compiled": args.compile,
        "length_multiple": args.length_multiple, "rows": rows, "tap": taps,
    })
    if args.plot:
        plot(rows, args.plot, f"{args.layers} layers at d={D}, {args.device} {args.dtype}")


def plot(rows: list[dict], path: str, title: str) -> None:
    """Latency against kept image tokens: TopK's forced counts as a line per batch size,
    LightVLA's own choice as a marker (a batch runs at its longest row's length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        fixed = sorted((r["kept"], r["latency_ms"]) for r in mine
                       if not r["pruner"].startswith("LightVLA"))
        line, = ax.plot([k for k, _ in fixed], [ms for _, ms in fixed], "o-",
                        label=f"batch {batch}: none / TopK")
        for r in mine:
            if r["pruner"].startswith("LightVLA"):
                ax.plot(r["kept"], r["latency_ms"], "*", markersize=12, color=line.get_color(),
                        label=f"batch {batch}: LightVLA (mean kept)")
    ax.set_xlabel("image tokens kept (of 512)")
    ax.set_ylabel("pruner + decoder latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
