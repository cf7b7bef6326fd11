"""Action heads: ``predict_action`` latency of five ways to decode an action chunk.

One assembly (a small ViT per prefix length, a linear projector, a proprio projector and
one Llama-shaped decoder shared by every head) and the same inputs for every head; only the
head and its mask policy change:

- ``discrete AR``: OpenVLA, ``DiscreteActionHead`` + ``ActionTokenizer``, ``CausalMask``:
  greedy generation of chunk x action = 56 tokens with the KV cache;
- ``L1 parallel``: OpenVLA-OFT, ``L1RegressionHead``, ``BidirectionalMask``: one pass;
- ``diffusion, OFT layout``: ``DiffusionActionHead(layout="oft")``, ``BidirectionalMask``:
  the timestep token sits in the prefix, so each of the 50 steps re-runs the whole sequence;
- ``diffusion, cached``: ``DiffusionActionHead(layout="cached")``,
  ``ParallelDecodingMask()``: the prefix is encoded once, each step runs the suffix
  (timestep, 56 slots, ``</s>``) against a read-only KV cache;
- ``flow, cached``: ``FlowMatchingHead`` (10 steps), ``ParallelDecodingMask()``;
- ``flow, full re-run``: the same head with ``layout="full"`` (the baseline its cached
  speed-up is measured against).

Prefix (``--prefix``): ``<s>``, image tokens, one proprio token and a prompt, sized to the
requested length: one 112 px view (64 patches of 14 px) below 515 tokens, two 224 px views
(2 x 256 patches) from there; the prompt fills the rest (80 -> 14 prompt tokens, 600 -> 86).
The vision tower is one tiny block (width 64), so the decoder dominates. The decoder is
Llama-shaped, d=512, 8 heads, MLP 1376, vocabulary 1024 (so that the LM head stays a few
per cent of a generation step, as in OpenVLA-7B), 2 layers by default (``--layers 4`` for a
deeper one: about twice the time, same shapes per layer). A prefix from 259 to 514 tokens
takes one 224 px view (256 patches).

Full size (OpenVLA-OFT-7B's shapes): ``--vision openvla`` takes OpenVLA's fused DINOv2-L +
SigLIP So400m towers (6-channel pixels, truncated at block -2, ``openvla_fused_encoder``)
and its MLP projector 2176 -> 8704 -> d -> d instead of the tiny ViT; with the Llama-2-7B
decoder shapes and bf16, built directly on the device (``vlakit.core.building``):

    python benchmarks/heads.py --device cuda --dtype bf16 --vision openvla --dim 4096 \
        --layers 32 --attn-heads 32 --kv-heads 32 --mlp-dim 11008 --vocab 32064 \
        --only l1 --prefix 536 --batch 1 --compile-mode reduce-overhead --warmup 3

(``--prefix 536``: 2 views + proprio + 22 prompt tokens; ``--prefix 280``: 1 view.)

Latency: median of ``--repeats`` calls of ``model.predict_action(inputs, sampling)`` (CPU fp32
by default), every call with ``Sampling(generator=torch.Generator(device).manual_seed(--seed))``
(prediction never reads torch's global random state, so each call, eager or compiled, draws
the same noise; the deterministic heads take the generator and draw nothing). The heads
compared with each other (discrete vs L1, OFT vs cached diffusion, full vs cached flow) take
turns run by run with their compiled twins (``_common.measure_turns``), so that load from
other processes falls on them alike.
Before timing, every model runs once with a single denoising step (the same decoder call
shapes as the timed calls): this is the compile warm-up of the compiled column
(``model.compile_for_inference()`` on a deep copy of the same weights), excluded from the
timings, and its output is compared with the eager one (``max |diff|``, same generator
seed). A configuration whose compilation fails is reported in the table, not raised.
``--compile-mode reduce-overhead`` compiles with CUDA graphs; give it ``--warmup 2`` or more
(untimed calls per model before the timed ones: CUDA graphs are recorded on the first calls).
On CUDA every row also carries the allocator's peak growth over one call (eager and compiled).

Speed-ups are printed next to their compute-bound ideal. Cached vs full re-run over ``K``
steps with prefix ``P`` and suffix ``S``: ``K (P + S) / (P + K S)`` decoder tokens
(``ideal tok``), and the same ratio in decoder FLOPs counting each attended key
(``ideal FLOPs``). L1 vs discrete: both push about ``P + 56`` tokens through the decoder,
so the compute-bound ideal is about 1; what parallel decoding saves is 55 sequential
one-token passes (``pass-bound`` ideal 56: the speed-up if every pass cost the same, as on
a weight-read- or launch-bound accelerator).

Peak memory (``--memory-probe``, run in a child process on CPU, see
``_common.cpu_memory_probe``): resident-set growth over one cached-diffusion prediction
with 50 steps and with 1 step, against the analytic KV-cache bytes of the prefix, one
suffix and 50 suffixes.

    python benchmarks/heads.py                          # CPU fp32, batch 1 and 8, P 80 and 600
    python benchmarks/heads.py --threads 1              # a shared machine: see --threads
    python benchmarks/heads.py --quick --batch 1        # smoke run
    python benchmarks/heads.py --json benchmarks/results/heads-cpu.json
"""

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    cpu_memory_probe,
    machine_name,
    measure_turns,
    peak_memory_mib,
    print_table,
    write_json,
)

from vlakit import VLA, VLAInputs  # noqa: E402
from vlakit.actions import ActionNormalizer, ActionTokenizer  # noqa: E402
from vlakit.core import (  # noqa: E402
    BidirectionalMask,
    CausalMask,
    ParallelDecodingMask,
    building,
)
from vlakit.decoders import llama  # noqa: E402
from vlakit.heads import (  # noqa: E402
    DiffusionActionHead,
    DiscreteActionHead,
    FlowMatchingHead,
    L1RegressionHead,
    Sampling,
)
from vlakit.interleave import PrefixInterleaver  # noqa: E402
from vlakit.projectors import LinearProjector, MLPProjector, ProprioProjector  # noqa: E402
from vlakit.vision import openvla_fused_encoder, vit  # noqa: E402

HEADS = ("discrete", "l1", "diffusion_oft", "diffusion_cached", "flow_cached", "flow_full")
LABELS = {
    "discrete": "discrete AR (OpenVLA)",
    "l1": "L1 parallel (OFT)",
    "diffusion_oft": "diffusion, OFT layout",
    "diffusion_cached": "diffusion, cached",
    "flow_cached": "flow, cached",
    "flow_full": "flow, full re-run",
}
# (baseline, candidate): timed in turns, eager and compiled together
PAIRS = (("discrete", "l1"), ("diffusion_oft", "diffusion_cached"),
         ("flow_full", "flow_cached"))
VIS_DIM, PROPRIO_DIM, BOS, EOS = 64, 8, 1, 2
OPENVLA_VIS_DIM, OPENVLA_PROJ_HIDDEN = 2176, 8704  # the fused towers' width; fc1's width
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
L1_GOAL, CACHED_GOAL = 5.0, 0.8  # L1 vs discrete at the shortest prefix; cached / ideal


# -- assembly --------------------------------------------------------------------------------


def image_layout(prefix: int) -> tuple[int, int, int]:
    """(views, image size, patches per view) for a requested prefix length."""
    if prefix < 256 + 3:
        views, size, patches = 1, 112, 64
    elif prefix < 2 * 256 + 3:
        views, size, patches = 1, 224, 256
    else:
        views, size, patches = 2, 224, 256
    if prefix - 2 - views * patches < 1:
        raise SystemExit(f"--prefix {prefix} is too short: the smallest is {views * patches + 3} "
                         f"(<s>, {views * patches} image tokens, proprio, one prompt token)")
    return views, size, patches


def build_blocks(args) -> dict:
    """The shared blocks: one decoder, projectors and a ViT per prefix length (seeded), built
    directly on ``--device`` in ``--dtype`` (no fp32 copy of a 7B decoder on the host)."""
    torch.manual_seed(0)
    with building(DTYPES[args.dtype], args.device):
        decoder = llama(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers,
                        num_heads=args.attn_heads, num_kv_heads=args.kv_heads,
                        mlp_dim=args.mlp_dim)
        if args.vision == "openvla":
            projector = MLPProjector([OPENVLA_VIS_DIM, OPENVLA_PROJ_HIDDEN, args.dim, args.dim])
        else:
            projector = LinearProjector(VIS_DIM, args.dim)
        blocks = {
            "decoder": decoder,
            "projector": projector,
            "proprio": ProprioProjector(PROPRIO_DIM, args.dim),
            "encoders": {},
        }
        for p in args.prefix:
            _, size, _ = image_layout(p)
            if size in blocks["encoders"]:
                continue
            if args.vision == "openvla":
                blocks["encoders"][size] = openvla_fused_encoder(size)
            else:
                blocks["encoders"][size] = vit(img_size=size, patch_size=14, dim=VIS_DIM,
                                               depth=1, num_heads=4, mlp_dim=2 * VIS_DIM)
    for module in (decoder, blocks["projector"], blocks["proprio"], *blocks["encoders"].values()):
        module.to(args.device).eval()
    return blocks


def in_channels(args) -> int:
    return 6 if args.vision == "openvla" else 3


def make_head(name: str, args):
    d, a, c = args.dim, args.action_dim, args.chunk
    if name == "discrete":
        return DiscreteActionHead(ActionTokenizer(args.vocab, a), chunk_size=c), CausalMask()
    if name == "l1":
        return L1RegressionHead(d, a, c), BidirectionalMask()
    if name.startswith("diffusion"):
        layout = name.split("_")[1]
        head = DiffusionActionHead(d, a, c, num_inference_steps=args.diffusion_steps,
                                   layout=layout)
        return head, BidirectionalMask() if layout == "oft" else ParallelDecodingMask()
    if name.startswith("flow"):
        layout = name.split("_")[1]
        return FlowMatchingHead(d, a, c, num_steps=args.flow_steps, layout=layout), \
            ParallelDecodingMask()
    raise KeyError(name)


def build_models(blocks: dict, prefix: int, args) -> dict:
    """One VLA per head over the same blocks (the heads' own weights seeded per head)."""
    _, size, _ = image_layout(prefix)
    norm = ActionNormalizer({"q01": [-1.0] * args.action_dim, "q99": [1.0] * args.action_dim})
    models = {}
    for i, name in enumerate(args.heads_):
        torch.manual_seed(100 + i)
        with building(DTYPES[args.dtype], args.device):
            head, policy = make_head(name, args)
        models[name] = VLA(
            blocks["encoders"][size], blocks["projector"], PrefixInterleaver(BOS, EOS),
            blocks["decoder"], policy, head=head, proprio_projector=blocks["proprio"],
            action_normalizer=norm,
        ).to(args.device).eval()
    return models


def make_inputs(prefix: int, batch: int, args) -> VLAInputs:
    views, size, patches = image_layout(prefix)
    prompt = prefix - 2 - views * patches
    g = torch.Generator().manual_seed(1000 * prefix + batch)
    low = 3  # past <s> and </s>; below the action ids, which sit at the vocabulary's top
    return VLAInputs(
        input_ids=torch.randint(low, args.vocab - 256, (batch, prompt), generator=g),
        text_valid=torch.ones(batch, prompt, dtype=torch.bool),
        pixels=torch.randn(batch, views, in_channels(args), size, size, generator=g),
        proprio=torch.randn(batch, PROPRIO_DIM, generator=g),
    ).to(args.device)


class fewer_steps:
    """Temporarily run a sampling head with ``steps`` steps (same decoder call shapes)."""

    def __init__(self, head, steps: int):
        self.head, self.steps = head, steps
        self.attr = next((a for a in ("num_inference_steps", "num_steps") if hasattr(head, a)),
                         None)

    def __enter__(self):
        if self.attr:
            self.saved = getattr(self.head, self.attr)
            setattr(self.head, self.attr, self.steps)

    def __exit__(self, *exc):
        if self.attr:
            setattr(self.head, self.attr, self.saved)


# -- work model: tokens and FLOPs ------------------------------------------------------------


def passes(name: str, prefix: int, args) -> list[tuple[int, int]]:
    """Decoder passes of one prediction at batch 1: (query tokens, attended (query, key)
    pairs), counting only the keys each mask lets a query see."""
    m = args.chunk * args.action_dim
    p = prefix
    causal = p * (p + 1) // 2
    if name == "discrete":  # prompt, then m - 1 one-token steps (the last token is not fed)
        return [(p, causal)] + [(1, p + i + 1) for i in range(m - 1)]
    if name == "l1":  # slots and </s>, bidirectional
        n = p + m + 1
        return [(n, n * n)]
    if name == "diffusion_oft":  # timestep in the prefix, slots, </s>; bidirectional
        n = p + 1 + m + 1
        return [(n, n * n)] * args.diffusion_steps
    if name == "diffusion_cached":  # causal prefix once; suffix sees prefix and itself
        s = 1 + m + 1
        return [(p, causal)] + [(s, s * (p + s))] * args.diffusion_steps
    s = args.chunk + 1  # flow: one token per chunk step, </s>
    if name == "flow_full":
        return [(p + s, causal + s * (p + s))] * args.flow_steps
    if name == "flow_cached":
        return [(p, causal)] + [(s, s * (p + s))] * args.flow_steps
    raise KeyError(name)


def decoder_tokens(name: str, prefix: int, args) -> int:
    return sum(q for q, _ in passes(name, prefix, args))


def decoder_flops(name: str, prefix: int, args) -> float:
    """Multiply-adds x 2 of the decoder layers (and the LM head for generation), batch 1."""
    d, hd = args.dim, args.dim // args.attn_heads
    q_dim, kv_dim = args.attn_heads * hd, args.kv_heads * hd
    per_token = 2 * args.layers * (d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * args.mlp_dim)
    per_pair = 2 * 2 * args.layers * q_dim  # q.k and p.v
    flops = sum(q * per_token + pairs * per_pair for q, pairs in passes(name, prefix, args))
    if name == "discrete":
        flops += args.chunk * args.action_dim * 2 * d * args.vocab
    return float(flops)


def kv_bytes_per_token(args) -> int:
    """Keys + values of one token over every layer, in ``--dtype``."""
    size = DTYPES[args.dtype].itemsize
    return args.layers * 2 * args.kv_heads * (args.dim // args.attn_heads) * size


# -- measurement -----------------------------------------------------------------------------


def sampling(args) -> Sampling:
    """A fresh generator at ``--seed`` on the model's device: every call (eager or compiled)
    draws the same noise; deterministic heads accept it and draw nothing."""
    return Sampling(generator=torch.Generator(args.device).manual_seed(args.seed))


def predict(model, inputs, args):
    def run():
        return model.predict_action(inputs, sampling(args))

    return run


def warm_up(models: dict, inputs, args, compiled: bool) -> tuple[dict, dict]:
    """One single-step call per model: outputs, and the error of any that failed."""
    outputs, errors = {}, {}
    device = args.device
    for name, model in models.items():
        try:
            with fewer_steps(model.head, 1):
                # clone: a CUDA-graph output may be overwritten by the next replay
                outputs[name] = model.predict_action(inputs, sampling(args)).float().clone()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - report any compile failure in the table
            if not compiled:
                raise
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"  compile failed for {name}: {errors[name]}", file=sys.stderr)
            traceback.print_exc(limit=3)
    return outputs, errors


def memory_probe(args) -> None:
    """Child process: peak memory of cached diffusion, K steps vs 1 step; one JSON line."""
    blocks = build_blocks(args)
    args.heads_ = ["diffusion_cached"]
    out = {}
    for p in args.prefix:
        model = build_models(blocks, p, args)["diffusion_cached"]
        for b in args.batch:
            inputs = make_inputs(p, b, args)
            with fewer_steps(model.head, 1):
                predict(model, inputs, args)()  # warm-up: thread pools, scheduler tables
                one = peak_memory_mib(predict(model, inputs, args), args.device)
            full = peak_memory_mib(predict(model, inputs, args), args.device)
            out[f"{p}x{b}"] = {"steps_1": one, f"steps_{args.diffusion_steps}": full}
    print(json.dumps(out))


def measure_memory(args) -> list[dict]:
    if args.device == "cpu":
        extra = ["--memory-probe", "--only", "diffusion_cached"]
        peaks = cpu_memory_probe(extra)
    else:
        saved = sys.stdout
        try:
            import io

            sys.stdout = io.StringIO()
            memory_probe(args)
            peaks = json.loads(sys.stdout.getvalue().strip().splitlines()[-1])
        finally:
            sys.stdout = saved
    k = args.diffusion_steps
    per_token = kv_bytes_per_token(args)
    s = 1 + args.chunk * args.action_dim + 1
    rows = []
    for p in args.prefix:
        for b in args.batch:
            peak = peaks[f"{p}x{b}"]
            mib = per_token * b / 2**20
            rows.append({
                "prefix": p, "batch": b, "steps": k,
                "peak_k_mib": peak[f"steps_{k}"], "peak_1_mib": peak["steps_1"],
                "growth_mib": peak[f"steps_{k}"] - peak["steps_1"],
                "kv_prefix_mib": p * mib, "kv_suffix_mib": s * mib,
                "kv_prefix_plus_suffix_mib": (p + s) * mib,
                "kv_k_suffixes_mib": k * s * mib,
                "kv_if_kept_mib": (p + k * s) * mib,
            })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="parameter dtype of every block (bf16: built directly in bf16)")
    p.add_argument("--vision", default="tiny", choices=["tiny", "openvla"],
                   help="tiny: one-block ViT, width 64; openvla: OpenVLA's fused DINOv2-L + "
                        "SigLIP towers and MLP projector (full size)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefix", type=int, nargs="+", default=[80, 600],
                   help="prefix lengths (tokens before the head's suffix)")
    p.add_argument("--only", nargs="+", default=list(HEADS), choices=HEADS,
                   help="time only these heads (default: all)")
    p.add_argument("--json", default=None, help="write results to this path")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one timed call per model (--repeats 1)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode of compile_for_inference (reduce-overhead: CUDA "
                        "graphs on a GPU); default: torch's default")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed calls per model before the timed ones (after the compile "
                        "warm-up; give CUDA graphs 2 or more)")
    p.add_argument("--seed", type=int, default=7,
                   help="seed of the Sampling generator every prediction gets")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per model (median)")
    p.add_argument("--diffusion-steps", type=int, default=50)
    p.add_argument("--flow-steps", type=int, default=10)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--action-dim", type=int, default=7)
    p.add_argument("--vocab", type=int, default=1024,
                   help="decoder vocabulary (the top 256 ids are action tokens)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=2,
                   help="decoder layers (2 keeps the default run near 10 min on 2 quiet cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, one per core); 1 on "
                        "a machine where other jobs hold a core (OpenMP barriers then stall)")
    p.add_argument("--attn-heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--mlp-dim", type=int, default=1376)
    p.add_argument("--recompile-limit", type=int, default=64,
                   help="torch._dynamo recompile limit (the decoder compiles once per call "
                        "shape: about 7 per prefix and batch; torch's default is 8)")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.heads_ = list(dict.fromkeys(args.only))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1
    if args.memory_probe:
        memory_probe(args)
        return
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               args.recompile_limit)
    compile_ = not args.no_compile
    compile_mode = None if args.compile_mode in (None, "default") else args.compile_mode
    cuda = args.device.startswith("cuda")
    load_start = os.getloadavg()
    started = time.time()
    blocks = build_blocks(args)
    compiled_blocks = copy.deepcopy(blocks) if compile_ else None
    params = sum(t.numel() for t in blocks["decoder"].parameters())
    vision_params = sum(t.numel() for e in blocks["encoders"].values() for t in e.parameters())
    print(f"machine: {machine_name(args.device)}; torch {torch.__version__}; {args.dtype}; "
          f"load average {load_start[0]:.2f} at start", flush=True)
    print(f"vision: {args.vision} ({vision_params / 1e6:.1f}M parameters over "
          f"{len(blocks['encoders'])} image size(s)); compile mode "
          f"{args.compile_mode or 'default'}", flush=True)
    print(f"decoder: Llama d={args.dim}, {args.layers} layers, {args.attn_heads} heads "
          f"({args.kv_heads} kv), MLP {args.mlp_dim}, vocab {args.vocab} ({params / 1e6:.1f}M "
          f"parameters); chunk {args.chunk} x action {args.action_dim}; diffusion "
          f"{args.diffusion_steps} steps, flow {args.flow_steps} steps; {args.repeats} timed "
          f"calls per model", flush=True)

    rows, speedups = [], []
    for prefix in args.prefix:
        eager_models = build_models(blocks, prefix, args)
        compiled_models = {}
        if compile_:
            compiled_models = build_models(compiled_blocks, prefix, args)
            for name, model in compiled_models.items():
                model.head.load_state_dict(eager_models[name].head.state_dict())
                model.compile_for_inference(mode=compile_mode)
        for batch in args.batch:
            inputs = make_inputs(prefix, batch, args)
            t0 = time.perf_counter()
            eager_out, _ = warm_up(eager_models, inputs, args, compiled=False)
            comp_out, errors = ({}, {})
            compile_s = float("nan")
            if compile_:
                t1 = time.perf_counter()
                comp_out, errors = warm_up(compiled_models, inputs, args, compiled=True)
                compile_s = time.perf_counter() - t1
            note = f" (compiled models {compile_s:.0f} s)" if compile_ else ""
            print(f"prefix {prefix}, batch {batch}: warm-up {time.perf_counter() - t0:.0f} s"
                  f"{note}", flush=True)
            timed: dict[tuple[str, str], float] = {}
            peaks: dict[tuple[str, str], float] = {}
            groups = [pair for pair in PAIRS if any(h in args.heads_ for h in pair)]
            for pair in groups:
                fns, keys = [], []
                for name in pair:
                    if name not in args.heads_:
                        continue
                    fns.append(predict(eager_models[name], inputs, args))
                    keys.append((name, "eager"))
                    if compile_ and name in comp_out:
                        fns.append(predict(compiled_models[name], inputs, args))
                        keys.append((name, "compiled"))
                t1 = time.perf_counter()
                # on CUDA also the allocator's peak growth over one call (CPU: the probe)
                results = measure_turns(fns, args.device, args.warmup, args.repeats,
                                        memory=cuda)
                for key, result in zip(keys, results):
                    timed[key] = result["latency_ms"]
                    peaks[key] = result["peak_mem_mib"]
                print(f"  timed {' / '.join(pair)} in {time.perf_counter() - t1:.0f} s "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
            for name in args.heads_:
                diff = float("nan")
                if name in comp_out:
                    diff = (comp_out[name] - eager_out[name]).abs().max().item()
                rows.append({
                    "prefix": prefix, "batch": batch, "head": name, "label": LABELS[name],
                    "eager_ms": timed[(name, "eager")],
                    "compiled_ms": timed.get((name, "compiled"), float("nan")),
                    "compile_error": errors.get(name) if compile_ else "not compiled",
                    "decoder_tokens": decoder_tokens(name, prefix, args) * batch,
                    "decoder_gflop": decoder_flops(name, prefix, args) * batch / 1e9,
                    "max_abs_diff_compiled": diff,
                    "eager_peak_mib": peaks.get((name, "eager"), float("nan")),
                    "compiled_peak_mib": peaks.get((name, "compiled"), float("nan")),
                    "load_average": os.getloadavg()[0],
                })
            speedups += compare(rows, prefix, batch, args)

    memory = [] if args.no_memory else measure_memory(args)
    load_end = os.getloadavg()
    print_results(rows, speedups, memory, args)
    elapsed = time.time() - started
    print(f"load average {load_end[0]:.2f} at the end; wall {elapsed / 60:.1f} min")
    write_json(args.json, {
        "benchmark": "heads",
        "machine": machine_name(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "decoder_params": params,
        "vision_params": vision_params,
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "args": {k: v for k, v in vars(args).items() if k != "heads_"},
        "load_average_start_end": [load_start[0], load_end[0]],
        "wall_s": elapsed,
        "goals": {"l1_vs_discrete_at_shortest_prefix": L1_GOAL,
                  "cached_diffusion_fraction_of_ideal": CACHED_GOAL},
        "rows": rows,
        "speedups": speedups,
        "memory": memory,
    })



def compare(rows: list[dict], prefix: int, batch: int, args) -> list[dict]:
    """Speed-ups of each pair at one prefix and batch, next to their ideals."""
    by = {r["head"]: r for r in rows if r["prefix"] == prefix and r["batch"] == batch}
    out = []
    for base, cand in PAIRS:
        if base not in by or cand not in by:
            continue
        b, c = by[base], by[cand]
        ideal_tok = decoder_tokens(base, prefix, args) / decoder_tokens(cand, prefix, args)
        ideal_flop = decoder_flops(base, prefix, args) / decoder_flops(cand, prefix, args)
        row = {
            "prefix": prefix, "batch": batch, "baseline": base, "candidate": cand,
            "eager_speedup": b["eager_ms"] / c["eager_ms"],
            "compiled_speedup": b["compiled_ms"] / c["compiled_ms"],
            "ideal_tokens": ideal_tok, "ideal_flops": ideal_flop,
        }
        if cand == "l1":
            row["ideal_pass_bound"] = float(args.chunk * args.action_dim)
            row["goal"] = f">= {L1_GOAL:g}x" if prefix == min(args.prefix) else ""
            row["eager_met"] = _met(row["eager_speedup"], L1_GOAL) if row["goal"] else None
            row["compiled_met"] = _met(row["compiled_speedup"], L1_GOAL) if row["goal"] else None
        else:
            row["ideal_pass_bound"] = float("nan")
            row["eager_of_ideal"] = row["eager_speedup"] / ideal_tok
            row["compiled_of_ideal"] = row["compiled_speedup"] / ideal_tok
            if cand == "diffusion_cached":
                row["goal"] = f">= {CACHED_GOAL:g} of ideal tok"
                row["eager_met"] = _met(row["eager_of_ideal"], CACHED_GOAL)
                row["compiled_met"] = _met(row["compiled_of_ideal"], CACHED_GOAL)
            else:
                row["goal"], row["eager_met"], row["compiled_met"] = "", None, None
        out.append(row)
    return out


def _met(value: float, goal: float) -> bool | None:
    return None if value != value else value >= goal  # nan (not measured): no verdict


def _fmt(value, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and value != value:
        return "-"
    return format(value, spec)


def print_results(rows, speedups, memory, args) -> None:
    print()
    print("Latency of model.predict_action (median ms; compiled: model.compile_for_inference(), "
          "warm-up excluded)")
    table = []
    for r in rows:
        compiled = _fmt(r["compiled_ms"], ".1f")
        if r["compile_error"] and r["compile_error"] != "not compiled":
            compiled = "failed: " + r["compile_error"].split(":")[0]
        table.append({
            "prefix": str(r["prefix"]), "batch": str(r["batch"]), "head": r["label"],
            "tokens": str(r["decoder_tokens"]), "gflop": _fmt(r["decoder_gflop"], ".1f"),
            "eager": _fmt(r["eager_ms"], ".1f"), "compiled": compiled,
            "ratio": _fmt(r["compiled_ms"] / r["eager_ms"], ".2f"),
            "ms_per_ktok": _fmt(r["eager_ms"] / r["decoder_tokens"] * 1000, ".1f"),
            "diff": _fmt(r["max_abs_diff_compiled"], ".1e"),
            "eager_mib": _fmt(r.get("eager_peak_mib"), ".1f"),
            "compiled_mib": _fmt(r.get("compiled_peak_mib"), ".1f"),
        })
    memory_columns = []
    if args.device.startswith("cuda"):
        memory_columns = [("eager_mib", "eager peak MiB", "s"),
                          ("compiled_mib", "compiled peak MiB", "s")]
    print_table(table, [("prefix", "prefix", "s"), ("batch", "batch", "s"), ("head", "head", "s"),
                        ("tokens", "decoder tokens", "s"), ("gflop", "decoder GFLOP", "s"),
                        ("eager", "eager ms", "s"), ("compiled", "compiled ms", "s"),
                        ("ratio", "compiled/eager", "s"),
                        ("ms_per_ktok", "eager ms per 1k tokens", "s"),
                        ("diff", "max |diff| compiled (1 step)", "s"), *memory_columns])
    print()
    print("Speed-ups (baseline ms / candidate ms) next to their compute-bound ideals")
    print(f"goals: cached diffusion >= {CACHED_GOAL:g} of its ideal K(P+S)/(P+KS); L1 parallel "
          f">= {L1_GOAL:g}x faster than discrete at the {min(args.prefix)}-token prefix")
    table = []
    for s in speedups:
        table.append({
            "prefix": str(s["prefix"]), "batch": str(s["batch"]),
            "pair": f"{LABELS[s['candidate']]} vs {LABELS[s['baseline']]}",
            "eager": _fmt(s["eager_speedup"], ".2f"),
            "compiled": _fmt(s["compiled_speedup"], ".2f"),
            "ideal_tok": _fmt(s["ideal_tokens"], ".2f"),
            "ideal_flop": _fmt(s["ideal_flops"], ".2f"),
            "pass": _fmt(s["ideal_pass_bound"], ".0f"),
            "e_of": _fmt(s.get("eager_of_ideal"), ".2f"),
            "c_of": _fmt(s.get("compiled_of_ideal"), ".2f"),
            "goal": s["goal"],
            "met": " / ".join(_fmt(s[k], "") for k in ("eager_met", "compiled_met")
                              if s[k] is not None) if s["goal"] else "",
        })
    print_table(table, [("prefix", "prefix", "s"), ("batch", "batch", "s"),
                        ("pair", "speed-up of", "s"),
                        ("eager", "eager", "s"), ("compiled", "compiled", "s"),
                        ("ideal_tok", "ideal tok", "s"), ("ideal_flop", "ideal FLOPs", "s"),
                        ("pass", "pass-bound", "s"), ("e_of", "eager / ideal tok", "s"),
                        ("c_of", "compiled / ideal tok", "s"), ("goal", "goal", "s"),
                        ("met", "met (eager / compiled)", "s")])
    if memory:
        print()
        k = memory[0]["steps"]
        print(f"Peak memory of cached diffusion (eager; MiB of growth over one predict_action): "
              f"{k} steps vs 1 step, and analytic {args.dtype} KV-cache sizes")
        table = [{
            "prefix": str(m["prefix"]), "batch": str(m["batch"]),
            "k": _fmt(m["peak_k_mib"], ".1f"), "one": _fmt(m["peak_1_mib"], ".1f"),
            "growth": _fmt(m["growth_mib"], "+.1f"), "kvp": _fmt(m["kv_prefix_mib"], ".1f"),
            "kvs": _fmt(m["kv_suffix_mib"], ".2f"),
            "kvps": _fmt(m["kv_prefix_plus_suffix_mib"], ".1f"),
            "kept": _fmt(m["kv_k_suffixes_mib"], ".1f"),
        } for m in memory]
        print_table(table, [("prefix", "prefix", "s"), ("batch", "batch", "s"),
                            ("k", f"peak, {k} steps", "s"), ("one", "peak, 1 step", "s"),
                            ("growth", f"{k} steps - 1 step", "s"), ("kvp", "KV prefix", "s"),
                            ("kvs", "KV 1 suffix", "s"), ("kvps", "KV prefix + suffix", "s"),
                            ("kept", f"KV {k} suffixes", "s")])


if __name__ == "__main__":
    main()
