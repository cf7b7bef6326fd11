"""pi0's 10-step loop: read-only prefix cache vs re-run vs clone per step, and vs LeRobot.

The loop against the read-only prefix cache, against re-running the prefix every step and
against cloning the cache every step (LeRobot's way), and side by side with LeRobot's own
``PI0Policy`` on the same weights and inputs.

Sizes: the real widths, fewer layers. PaliGemma's Gemma-2B (width 2048, 8 heads, 1 KV head,
head width 256, MLP 16384) and the "gemma_300m" expert (width 1024, MLP 4096, the same
heads) with ``--layers`` layers each (2 by default; 18 is pi0), SigLIP So400m/14 (1152 wide,
16 heads, MLP 4304, 224 px: 256 tokens per camera) with ``--vision-layers`` blocks (2; 27 is
pi0), vocabulary ``--vocab`` (16384 by default: the embedding is one lookup, so latency does
not depend on it; 257152 is pi0's and makes every LeRobot load about a minute longer on 2
cores, see "Memory"). Chunk 50, actions and state padded to 32 (state 8, action 7), 10
Euler steps, a prompt of 48 tokens (all real). Prefix ``P = 256 · cameras + 48`` tokens,
suffix ``S = 51`` (the state token and 50 action tokens), ``K = 10`` steps.

vlakit modes, one model and one set of inputs (``Sampling(noise=...)``, the same noise
everywhere, so every mode gives the same actions; checked, max |diff| printed):

- ``cache``: ``model.predict_action(inputs, Sampling(noise=noise))``: the prefix encoded
  once, 10 expert passes against the read-only cache, each writing its keys and values into
  slots reserved after the prefix (nothing of the prefix copied per step);
- ``rerun``: the images encoded once, then every step ``runner.prefix(suffix_len=S)`` (the
  whole PaliGemma prefix re-encoded) and one expert pass (``head.velocity``) against it:
  the cost of no prefix cache (ideal ratio to ``cache`` ``K(P+S)/(P+KS)`` decoder tokens;
  ``ideal FLOPs`` counts the vision tower, attention and the expert too);
- ``clone``: the prefix encoded once into a read-only view, and before every step its keys
  and values cloned (then concatenated with the step's own, as a ``DynamicCache`` does):
  what LeRobot's ``denoise_step`` does (``clone_past_key_values``);
- ``pruned``: ``cache`` with ``TopKPruner(keep_ratio=--keep-ratio)`` on the prefix's image
  tokens (``add_pruner`` on a second ``VLA`` sharing every block of the first), so
  ``P' = keep · 256 · cameras + 48``. Its actions differ by design (not compared).

LeRobot (``--lerobot-python``, a LeRobot 0.6.1 interpreter): ``benchmarks/_lerobot_pi0.py``
builds LeRobot's ``PI0Policy`` with random weights at the same sizes in a subprocess and
writes it with ``save_pretrained``; vlakit loads that directory with ``load_pi0(...,
build=...)`` (the tested loader), so both run the same weights. LeRobot picks its sizes by
variant name (``get_gemma_config``) and hard-codes SigLIP's depth and the vocabulary, so at
reduced depth these are overridden inside the LeRobot subprocess only (the patches are
listed in ``_lerobot_pi0.py`` and in the JSON). Without ``--lerobot-python`` vlakit builds
random weights itself. LeRobot's timed call is ``policy.model.sample_actions(images,
img_masks, tokens, masks, state, noise=noise)`` on the same preprocessed images ``[-1, 1]``,
tokens, state and noise (state and actions unnormalised: the policy's normalisation is
IDENTITY); vlakit's ``cache`` row gets the same tensors as ``VLAInputs``. The ratios
vlakit/LeRobot are printed next to the FLOP ratio of the two (vlakit builds PaliGemma's last
layer as its keys and values only, which is about 1/``--layers`` of the prefix: half at 2
layers, 1/18 at pi0's depth, so the FLOP ratio at 18 layers is printed too).

Timing: every configuration (batch x cameras) runs in fresh worker processes, one per side,
both alive at once and driven by this script over a pipe (one JSON command per call), so
that vlakit's modes and LeRobot take turns call by call (load from other processes falls on
all alike). Per callable: ``--warmup`` untimed calls (the first one's actions are the ones
compared), then ``--repeats`` timed calls in turns; median, min and max reported. Threads:
``torch.set_num_threads(--threads)`` on both sides (default: one per core). To keep the
default run under 10 minutes on 2 quiet cores, ``--max-batch`` (default ``rerun=1 clone=1
pruned=1``) runs ``rerun`` (about ``K`` times ``cache``), ``clone`` and ``pruned`` at batch
1 only; ``--max-batch`` with no value runs every mode at every batch (the whole matrix:
about 15 minutes more; one rerun call at batch 8 takes about 40 s with 1 camera, 95 s with
3). On a
machine where other jobs hold the cores the spreads grow to several times the median
(OpenMP barriers stall): compare rows of one run, and the ratios, which are measured in
turns.

Memory: after the timed calls each worker fixes glibc's mmap threshold at 64 KiB and
releases free heap pages (``malloc_trim``), then for each callable resets the resident
set's high-water mark (``/proc/self/clear_refs``) and runs it once: peak MiB is ``VmHWM``
after the call minus ``VmRSS`` before it, the same measure on both sides (CUDA: the
allocator's peak over what was allocated before). ``resident MiB`` is what the worker
holds after the timed calls over what it held after its imports (the weights, as far as
touched: vlakit's loader maps them from the safetensors file, LeRobot's copies them; and
whatever the calls left behind; CUDA: allocated bytes). LeRobot's build also holds both never-read
LM heads: at ``--vocab 257152`` that is 790M parameters, 3.0 GiB in fp32.

GPU (``--device cuda --dtype bf16``, pi0's full depth): ``--variants`` adds, for the
``cache`` mode, ``compiled`` (a deep copy with ``compile_for_inference(mode=
--compile-mode)`` and the action expert compiled as well: ``compile_for_inference`` compiles
the encoder, projector and decoder only, not ``head.expert``, which runs the 10-step loop)
and ``graph`` (the whole ``predict_action`` captured in one ``torch.cuda.CUDAGraph`` after
eager warm-up calls, replayed per chunk with the noise copied into its static input; peak
memory is the capture's, which its private pool keeps). The capture needs
``vlakit.validation(False)`` and skips ``VLAPrefix``'s once-per-prefix mask check, a host
read that cannot be captured (it ran in the warm-up). A variant that fails is reported, not
raised.

    # the CPU run of benchmarks/results/pi0-cpu.json (about 9 minutes on 2 cores)
    .venv/bin/python benchmarks/pi0.py --lerobot-python /work/lerobot-venv/bin/python \\
        --json benchmarks/results/pi0-cpu.json
    .venv/bin/python benchmarks/pi0.py                        # vlakit alone, random weights
    .venv/bin/python benchmarks/pi0.py --batch 1 --cameras 1 --repeats 2   # smoke run
    # the whole matrix (rerun, clone and pruned at batch 8 too), pi0's vocabulary
    .venv/bin/python benchmarks/pi0.py --lerobot-python /work/lerobot-venv/bin/python \\
        --max-batch --vocab 257152
    # full-size pi0 on a GPU, bf16, 1/2/3 cameras: eager vs one CUDA graph (and the
    # cache-free and cloning loops, eager); then the compiled 10-step loop (the expert)
    .venv/bin/python benchmarks/pi0.py --device cuda --dtype bf16 --layers 18 \\
        --vision-layers 27 --vocab 257152 --batch 1 --cameras 1 2 3 \\
        --modes cache clone rerun --variants eager graph --no-validation --repeats 10 \\
        --warmup 3 --json benchmarks/results/pi0-full_cuda_bf16.json
    .venv/bin/python benchmarks/pi0.py --device cuda --dtype bf16 --layers 18 \\
        --vision-layers 27 --vocab 257152 --batch 1 --cameras 1 --modes cache \\
        --variants eager compiled --compile-parts expert --no-validation --repeats 10 \\
        --warmup 3 --json benchmarks/results/pi0-full-compiled_cuda_bf16.json
"""

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_name, print_table, write_json  # noqa: E402
from _lerobot_pi0 import protocol_stream, resident_mib, serve  # noqa: E402

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LEROBOT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MODES = ("cache", "rerun", "clone", "pruned")
VARIANTS = ("eager", "compiled", "graph")
CHUNK, MAX_DIM, STEPS, PROMPT, STATE_DIM, ACTION_DIM = 50, 32, 10, 48, 8, 7
IMG, PATCH = 224, 14
PER_VIEW = (IMG // PATCH) ** 2  # 256 image tokens per camera
SUFFIX = 1 + CHUNK  # the state token and the action tokens
# real widths (PaliGemma's Gemma-2B, gemma_300m, SigLIP So400m/14)
D, HEADS, KV_HEADS, HEAD_DIM, MLP = 2048, 8, 1, 256, 16384
E, E_MLP = 1024, 4096
V_DIM, V_HEADS, V_MLP = 1152, 16, 4304
# agreement of the actions: max |diff| <= ATOL + RTOL * max |actions of cache|
ATOL, RTOL = {"fp32": 1e-4, "bf16": 2e-2}, {"fp32": 1e-4, "bf16": 2e-2}


# -- the model ---------------------------------------------------------------------------------


def build_pi0(*, layers: int, vision_layers: int, vocab: int, action_dim: int = ACTION_DIM,
              chunk_size: int = CHUNK, num_steps: int = STEPS, max_dim: int = MAX_DIM,
              prompt_length: int = PROMPT, num_views: int | None = None, img_size: int = IMG,
              action_normalizer=None, proprio_normalizer=None, dtype=None, device=None):
    """pi0 at the real widths with ``layers`` Gemma / expert layers and ``vision_layers``
    SigLIP blocks (``layers=18, vision_layers=27, vocab=257152`` is ``pi0_3b``). Also the
    ``build=`` of ``load_pi0``, which passes the directory's options; ``num_views`` is
    left open (the directory lists 3 cameras, the 1-camera rows feed one)."""
    from vlakit.core import building
    from vlakit.models import pi0, pi0_decoder, pi0_expert, pi0_preprocessing
    from vlakit.projectors import LinearProjector
    from vlakit.vision import vit

    with building(dtype, device):
        encoder = vit(img_size=img_size, patch_size=PATCH, dim=V_DIM, depth=vision_layers,
                      num_heads=V_HEADS, mlp_dim=V_MLP, gelu_approximate="tanh",
                      preprocessing=pi0_preprocessing(img_size))
        return pi0(encoder=encoder, projector=LinearProjector(V_DIM, D, bias=True),
                   decoder=pi0_decoder(vocab_size=vocab, num_layers=layers),
                   expert=pi0_expert(num_layers=layers), action_dim=action_dim,
                   chunk_size=chunk_size, num_steps=num_steps, max_dim=max_dim,
                   prompt_length=prompt_length, num_views=None, image_token_id=vocab,
                   action_normalizer=action_normalizer, proprio_normalizer=proprio_normalizer)


def randomize_constants(model, seed: int) -> None:
    """Noise on every constant-valued parameter (Gemma's RMSNorm weights start at 0), as
    ``_lerobot_pi0.save`` does to LeRobot's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or float(p.float().std()) == 0.0:
                p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.device, p.dtype))


def make_inputs(batch: int, cameras: int, vocab: int, seed: int) -> dict:
    """What both sides read: preprocessed images in [-1, 1], a 48-token prompt (``<bos>``
    first, every token real), the (already normalised) state and the noise."""
    g = torch.Generator().manual_seed(seed + 1000 * cameras + batch)
    tokens = torch.randint(3, vocab, (batch, PROMPT), generator=g)
    tokens[:, 0] = 2  # <bos>
    return {
        "images": torch.rand(batch, cameras, 3, IMG, IMG, generator=g) * 2 - 1,
        "tokens": tokens,
        "masks": torch.ones(batch, PROMPT, dtype=torch.bool),
        "state": torch.randn(batch, STATE_DIM, generator=g),
        "noise": torch.randn(batch, CHUNK, MAX_DIM, generator=g),
    }


# -- work model: tokens and FLOPs --------------------------------------------------------------


def prefix_tokens(cameras: int, keep: int | None = None) -> int:
    return (PER_VIEW * cameras if keep is None else keep) + PROMPT


def ideal_tokens(p: int) -> float:
    """Decoder tokens of re-running the prefix every step over the cache's: K(P+S)/(P+KS)."""
    return STEPS * (p + SUFFIX) / (p + STEPS * SUFFIX)


def flops(batch: int, cameras: int, layers: int, vision_layers: int, *, impl: str = "vlakit",
          mode: str = "cache", kept: int | None = None) -> float:
    """Multiply-adds x 2 of one chunk: the vision tower and projector, the prefix through
    PaliGemma (vlakit: ``layers - 1`` whole layers and the last one's K/V; LeRobot: every
    layer whole), ``K`` expert passes against ``P`` keys and the head's projections."""
    p, s = prefix_tokens(cameras, kept), SUFFIX
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    vis_layer = 2 * PER_VIEW * (4 * V_DIM**2 + 2 * V_DIM * V_MLP) + 4 * PER_VIEW**2 * V_DIM
    vision = cameras * (vision_layers * vis_layer + 2 * PER_VIEW * 3 * PATCH**2 * V_DIM
                        + 2 * PER_VIEW * V_DIM * D)

    def layer(n, keys, d, mlp):
        return 2 * n * (d * q + 2 * d * kv + q * d + 3 * d * mlp) + 4 * n * keys * q

    whole = layers if impl == "lerobot" else layers - 1
    prefix = whole * layer(p, p, D, MLP) + (0 if impl == "lerobot" else 2 * p * 2 * D * kv)
    head = 2 * (CHUNK * MAX_DIM * E + CHUNK * 2 * E * E + CHUNK * E * E + MAX_DIM * E
                + CHUNK * E * MAX_DIM)
    step = layers * layer(s, p + s, E, E_MLP) + head
    per_chunk = vision + (STEPS if mode == "rerun" else 1) * prefix + STEPS * step
    return float(batch * per_chunk)


# -- the vlakit worker (a subprocess per configuration) ---------------------------------------


def per_step_loop(model, inputs, noise, mode: str):
    """``rerun`` and ``clone`` from vlakit's public pieces: the runner (images encoded once),
    ``runner.prefix``, ``head.velocity`` and ``euler``."""
    import torch.nn.functional as F

    from vlakit.decoders import PrefixKVView
    from vlakit.heads import euler

    head = model.head

    @torch.no_grad()
    def run():
        runner = model.runner(inputs)
        proprio = runner.proprio()
        state = F.pad(proprio.to(torch.float32), (0, head.max_dim - proprio.shape[-1]))
        if mode == "clone":
            prefix = runner.prefix()  # a read-only view: each step concatenates its own K/V
            keys, values, n = prefix.cache.keys, prefix.cache.values, prefix.cache.length

        def velocity(x, t):
            if mode == "rerun":  # the whole PaliGemma prefix again, every step
                step_prefix = runner.prefix(suffix_len=head.num_action_tokens)
            else:  # LeRobot's denoise_step: clone_past_key_values, then the expert
                step_prefix = prefix
                prefix.cache = PrefixKVView([None if k is None else k.clone() for k in keys],
                                            [None if v is None else v.clone() for v in values],
                                            n)
            return head.velocity(step_prefix, x, t, state)

        return euler(velocity, noise, head.num_steps)[..., : head.action_dim]

    return run


def cuda_graph(model, inputs, noise, warmup: int):
    """The whole ``predict_action`` in one CUDA graph; returns (call, capture peak MiB)."""
    import vlakit
    from vlakit.heads import Sampling
    from vlakit.runner import VLAPrefix

    static_noise = noise.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), vlakit.validation(False):
        for _ in range(max(2, warmup)):
            model.predict_action(inputs, Sampling(noise=static_noise))
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    check = VLAPrefix._check_prefix_blind
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:  # a host read cannot be captured; the eager warm-up calls ran the check
        VLAPrefix._check_prefix_blind = lambda self, spec, n: setattr(self, "_checked_blind",
                                                                       True)
        with vlakit.validation(False), torch.cuda.graph(graph):
            out = model.predict_action(inputs, Sampling(noise=static_noise))
    finally:
        VLAPrefix._check_prefix_blind = check
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20

    def call():
        static_noise.copy_(noise)  # a new chunk's inputs go into the static buffers
        graph.replay()
        return out.clone()

    return call, peak


def worker(spec: dict) -> None:
    proto = protocol_stream()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from safetensors.torch import load_file

    import vlakit
    from vlakit import VLA, VLAInputs
    from vlakit.heads import Sampling
    from vlakit.models import load_pi0
    from vlakit.processors import word_tokenizer
    from vlakit.pruners import TopKPruner

    vlakit.set_validation(spec["validation"])
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    cuda = device.startswith("cuda")
    base = resident_mib(device)
    sizes = dict(layers=spec["layers"], vision_layers=spec["vision_layers"],
                 vocab=spec["vocab"])
    start = time.perf_counter()
    if spec["checkpoint"]:
        tokenizer = word_tokenizer("pick up the cube", specials=("<pad>", "<eos>", "<bos>",
                                                                  "<unk>"))
        model = load_pi0(spec["checkpoint"], tokenizer, dtype=dtype, device=device,
                         build=functools.partial(build_pi0, **sizes)).model
    else:
        torch.manual_seed(spec["seed"])
        model = build_pi0(**sizes, dtype=dtype, device=device)
        randomize_constants(model, spec["seed"])
    model.eval()
    load_s = time.perf_counter() - start
    loaded = resident_mib(device) - base

    raw = load_file(spec["inputs"])
    b, views = raw["images"].shape[:2]
    placeholders = torch.full((b, views * PER_VIEW), spec["vocab"])
    inputs = VLAInputs(
        input_ids=torch.cat((placeholders, raw["tokens"]), 1),
        text_valid=torch.cat((torch.ones_like(placeholders, dtype=torch.bool), raw["masks"]), 1),
        pixels=raw["images"], proprio=raw["state"],
    ).to(device)
    noise = raw["noise"].to(device)

    def predict(m):
        return lambda: m.predict_action(inputs, Sampling(noise=noise))

    calls, info, errors, memory = {}, {}, {}, {}
    for mode in spec["modes"]:
        if mode == "cache":
            calls["cache"] = predict(model)
        elif mode in ("rerun", "clone"):
            calls[mode] = per_step_loop(model, inputs, noise, mode)
        elif mode == "pruned":
            pruned = VLA(model.encoder, model.projector, model.interleaver, model.decoder,
                         model.mask_policy, head=model.head,
                         action_normalizer=model.action_normalizer,
                         proprio_normalizer=model.proprio_normalizer,
                         num_views=model.num_views)
            pruner = TopKPruner(keep_ratio=spec["keep_ratio"])
            try:
                pruned.add_pruner(pruner)
                calls["pruned"] = predict(pruned.eval())
                info["kept"] = pruner.count(views * PER_VIEW)
            except Exception as error:
                errors["pruned"] = f"{type(error).__name__}: {error}"
    for variant in spec["variants"]:
        name = f"cache[{variant}]"
        try:
            if variant == "compiled":
                twin = copy.deepcopy(model)
                mode = spec["compile_mode"]
                if spec["compile_parts"] == "model":  # encoder, projector, decoder
                    twin.compile_for_inference(mode=mode)
                # compile_for_inference leaves the expert (the 10-step loop) eager
                twin.head.expert.compile(fullgraph=True, dynamic=False, mode=mode)
                calls[name] = predict(twin)
            elif variant == "graph":
                if not cuda:
                    raise RuntimeError("CUDA graphs need --device cuda")
                calls[name], memory[name] = cuda_graph(model, inputs, noise, spec["warmup"])
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"[:2000]
    info.update(params=sum(p.numel() for p in model.parameters()), load_s=load_s,
                loaded_mib=loaded, threads=torch.get_num_threads(), errors=errors,
                torch=torch.__version__, names=list(calls))
    serve(proto, calls, info, device, base=base, memory=memory)


# -- the parent: workers, turns, tables --------------------------------------------------------


class Worker:
    """A worker subprocess speaking ``_lerobot_pi0``'s protocol; stderr goes to ``log``."""

    def __init__(self, label: str, cmd: list[str], log: Path, env: dict | None = None):
        self.label, self.log_path = label, log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"the {self.label} worker exited ({self.proc.wait()}):\n{tail}")
        return json.loads(line)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()  # this worker only: the process this object started
            self.proc.wait()
        self.log.close()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return machine_name("cpu")


def run_config(batch: int, cameras: int, args, tmp: Path, checkpoint: str | None) -> dict:
    """One configuration: fresh workers, warm-up, timed calls in turns, memory, agreement."""
    from safetensors.torch import load_file, save_file

    tag = f"b{batch}_c{cameras}"
    inputs = tmp / f"inputs_{tag}.safetensors"
    save_file(make_inputs(batch, cameras, args.vocab, args.seed), str(inputs))
    modes = [m for m in args.modes if batch <= args.max_batch_.get(m, batch)]
    variants = [v for v in args.variants if v != "eager"]
    spec = dict(device=args.device, dtype=args.dtype, layers=args.layers,
                vision_layers=args.vision_layers, vocab=args.vocab, threads=args.threads,
                inputs=str(inputs), checkpoint=checkpoint, seed=args.seed, modes=modes,
                variants=variants, keep_ratio=args.keep_ratio, compile_mode=args.compile_mode,
                compile_parts=args.compile_parts, validation=not args.no_validation,
                warmup=args.warmup)
    workers = []
    started = time.perf_counter()
    try:
        if args.lerobot_python:  # LeRobot first: its load peak is over before vlakit loads
            workers.append(Worker("LeRobot", [
                args.lerobot_python, str(HERE / "_lerobot_pi0.py"), "serve", checkpoint,
                str(inputs), *lerobot_sizes(args), "--threads", str(args.threads)],
                tmp / f"lerobot_{tag}.log"))
        workers.insert(0, Worker("vlakit", [sys.executable, __file__, "--worker",
                                            json.dumps(spec)], tmp / f"vlakit_{tag}.log"))
        load_s = time.perf_counter() - started
        calls = [(w, name) for w in workers for name in
                 (w.info["names"] if w.label == "vlakit" else ["sample_actions"])]
        errors = {f"{w.label}:{k}": v for w in workers for k, v in w.info.get("errors",
                                                                               {}).items()}
        outputs, times = {}, {}
        for w, name in calls:  # the first warm-up call also writes the actions
            key = f"{w.label}:{name}"
            answer = w.ask(op="save", name=name, path=str(tmp / f"{tag}_{key}.safetensors"))
            if "error" in answer:
                errors[key] = answer["error"]
            else:
                outputs[key] = load_file(str(tmp / f"{tag}_{key}.safetensors"))["actions"]
                times[key] = []
        live = [(w, name) for w, name in calls if f"{w.label}:{name}" in times]
        for _ in range(args.warmup - 1):
            for w, name in live:
                w.ask(op="run", name=name)
        loads = []
        for _ in range(args.repeats):
            for w, name in live:
                answer = w.ask(op="run", name=name)
                times[f"{w.label}:{name}"].append(answer["ms"])
                loads.append(answer["load"])
        resident = {w.label: w.ask(op="resident")["mib"] for w in workers}
        peaks = {}
        if not args.no_memory:
            for w, name in live:
                answer = w.ask(op="mem", name=name)
                peaks[f"{w.label}:{name}"] = answer.get("mib", float("nan"))
        infos = {w.label: w.info for w in workers}
    finally:
        for w in workers:
            w.close()
    wall = time.perf_counter() - started
    print(f"batch {batch}, {cameras} camera(s): workers loaded in {load_s:.0f} s, done in "
          f"{wall:.0f} s (load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f})",
          flush=True)
    return dict(batch=batch, cameras=cameras, times=times, peaks=peaks, outputs=outputs,
                errors=errors, infos=infos, resident=resident, wall_s=wall, load_average=loads)


def lerobot_sizes(args) -> list[str]:
    return ["--layers", str(args.layers), "--vision-layers", str(args.vision_layers),
            "--vocab", str(args.vocab), "--device", args.device,
            "--dtype", LEROBOT_DTYPES[args.dtype]]


def _stats(ms: list[float]) -> dict:
    if not ms:
        return {"median_ms": float("nan"), "min_ms": float("nan"), "max_ms": float("nan"),
                "spread": float("nan"), "ms": []}
    med = statistics.median(ms)
    return {"median_ms": med, "min_ms": min(ms), "max_ms": max(ms),
            "spread": (max(ms) - min(ms)) / med, "ms": ms}


def _diff(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return (a.float() - b.float()).abs().max().item()


def tolerance(ref, dtype: str) -> float:
    scale = float("nan") if ref is None else ref.float().abs().max().item()
    return ATOL[dtype] + RTOL[dtype] * scale


def summarize(result: dict, args) -> tuple[list[dict], dict | None]:
    """Rows of the vlakit table and the vlakit/LeRobot comparison of one configuration."""
    b, c = result["batch"], result["cameras"]
    times, peaks, outs = result["times"], result["peaks"], result["outputs"]
    vinfo = result["infos"].get("vlakit", {})
    kept = vinfo.get("kept")
    ref = outs.get("vlakit:cache")
    tol = tolerance(ref, args.dtype)
    p = prefix_tokens(c)
    cache_ms = _stats(times.get("vlakit:cache", []))["median_ms"]
    base_flops = flops(b, c, args.layers, args.vision_layers)
    rows = []
    names = [f"vlakit:{n}" for n in vinfo.get("names", [])]
    names += [k for k in result["errors"] if k.startswith("vlakit:") and k not in names]
    for key in names:
        name = key.split(":", 1)[1]
        mode = name.split("[")[0]
        stats = _stats(times.get(key, []))
        f = flops(b, c, args.layers, args.vision_layers, mode=mode,
                  kept=kept if mode == "pruned" else None)
        tokens_p = prefix_tokens(c, kept) if mode == "pruned" else p
        diff = float("nan") if mode == "pruned" else _diff(outs.get(key), ref)
        rows.append({
            "batch": b, "cameras": c, "mode": name, "prefix": tokens_p, "suffix": SUFFIX,
            **stats, "peak_mib": peaks.get(key, float("nan")),
            "vs_cache": stats["median_ms"] / cache_ms,
            "ideal_tokens": ideal_tokens(p) if mode == "rerun" else float("nan"),
            "ideal_flops": f / base_flops, "gflop": f / 1e9,
            "max_abs_diff_vs_cache": diff,
            "pruned_diff_vs_cache": _diff(outs.get(key), ref) if mode == "pruned" else None,
            "agrees": None if mode == "pruned" or diff != diff else diff <= tol,
            "error": result["errors"].get(key),
        })
    compare = None
    if "LeRobot" in result["infos"] or "LeRobot:sample_actions" in result["errors"]:
        lr = _stats(times.get("LeRobot:sample_actions", []))
        vpeak = peaks.get("vlakit:cache", float("nan"))
        lpeak = peaks.get("LeRobot:sample_actions", float("nan"))
        lflops = flops(b, c, args.layers, args.vision_layers, impl="lerobot")
        full = (flops(b, c, 18, 27) / flops(b, c, 18, 27, impl="lerobot"))
        diff = _diff(outs.get("LeRobot:sample_actions"), ref)
        vres = result["resident"].get("vlakit", float("nan"))
        lres = result["resident"].get("LeRobot", float("nan"))
        ratio_ms = cache_ms / lr["median_ms"]
        compare = {
            "batch": b, "cameras": c, "prefix": p, "vlakit_ms": cache_ms,
            "vlakit_spread": _stats(times.get("vlakit:cache", []))["spread"],
            "lerobot_ms": lr["median_ms"], "lerobot_spread": lr["spread"],
            "lerobot_min_ms": lr["min_ms"], "lerobot_max_ms": lr["max_ms"],
            "lerobot_ms_all": lr["ms"], "ratio_ms": ratio_ms,
            "vlakit_clone_over_lerobot": _stats(times.get("vlakit:clone", []))["median_ms"]
            / lr["median_ms"],
            "vlakit_peak_mib": vpeak, "lerobot_peak_mib": lpeak, "ratio_peak": vpeak / lpeak,
            "vlakit_resident_mib": vres, "lerobot_resident_mib": lres,
            "ratio_resident": vres / lres, "flop_ratio": base_flops / lflops,
            "ratio_ms_over_flop_ratio": ratio_ms / (base_flops / lflops),
            "flop_ratio_at_18_layers": full, "max_abs_diff_vs_vlakit": diff,
            "agrees": None if diff != diff else diff <= tol, "tolerance": tol,
            "faster": ratio_ms < 1, "smaller": vpeak < lpeak and vres < lres,
            "error": result["errors"].get("LeRobot:sample_actions"),
        }
    return rows, compare


def _f(value, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and value != value:
        return "-"
    return format(value, spec)


def print_tables(rows: list[dict], compares: list[dict], args) -> None:
    print()
    print(f"vlakit, one 10-step chunk per call (median ms of {args.repeats}, spread = "
          f"(max - min) / median; peak MiB = memory growth over one call)")
    table = [{
        "batch": str(r["batch"]), "cameras": str(r["cameras"]), "mode": r["mode"],
        "ps": f"{r['prefix']} + {r['suffix']}", "ms": _f(r["median_ms"], ".0f"),
        "spread": _f(r["spread"], ".0%"), "mib": _f(r["peak_mib"], ".0f"),
        "vs": _f(r["vs_cache"], ".2f"), "tok": _f(r["ideal_tokens"], ".2f"),
        "fl": _f(r["ideal_flops"], ".2f"),
        "diff": _f(r["max_abs_diff_vs_cache"], ".1e") if r["pruned_diff_vs_cache"] is None
        else f"({_f(r['pruned_diff_vs_cache'], '.1e')})",
        "ok": ("failed: " + r["error"].split(":")[0]) if r["error"] else _f(r["agrees"], ""),
    } for r in rows]
    print_table(table, [("batch", "batch", "s"), ("cameras", "cameras", "s"),
                        ("mode", "mode", "s"), ("ps", "P + S", "s"), ("ms", "ms", "s"),
                        ("spread", "spread", "s"), ("mib", "peak MiB", "s"),
                        ("vs", "/ cache", "s"), ("tok", "ideal tok", "s"),
                        ("fl", "ideal FLOPs", "s"), ("diff", "max |diff| vs cache", "s"),
                        ("ok", "agrees", "s")])
    print("(ideal tok: K(P+S)/(P+KS); ideal FLOPs: this mode's FLOPs / cache's, vision and "
          "attention included; pruned: P is the pruned prefix, its |diff| in brackets is "
          "not a check)")
    if not compares:
        return
    print()
    print("vlakit (cache) vs LeRobot PI0Policy.model.sample_actions, same weights and inputs "
          "(ratios vlakit / LeRobot; goal: < 1 on every row)")
    table = [{
        "batch": str(c["batch"]), "cameras": str(c["cameras"]),
        "v": f"{_f(c['vlakit_ms'], '.0f')} ({_f(c['vlakit_spread'], '.0%')})",
        "l": f"{_f(c['lerobot_ms'], '.0f')} ({_f(c['lerobot_spread'], '.0%')})",
        "r": _f(c["ratio_ms"], ".2f"), "cl": _f(c["vlakit_clone_over_lerobot"], ".2f"),
        "fr": f"{_f(c['flop_ratio'], '.2f')} / {_f(c['flop_ratio_at_18_layers'], '.2f')}",
        "eff": _f(c["ratio_ms_over_flop_ratio"], ".2f"),
        "vp": _f(c["vlakit_peak_mib"], ".0f"), "lp": _f(c["lerobot_peak_mib"], ".0f"),
        "rp": _f(c["ratio_peak"], ".2f"), "vr": _f(c["vlakit_resident_mib"], ".0f"),
        "lr": _f(c["lerobot_resident_mib"], ".0f"), "rr": _f(c["ratio_resident"], ".2f"),
        "d": _f(c["max_abs_diff_vs_vlakit"], ".1e"),
        "goal": ("failed: " + c["error"].split(":")[0]) if c["error"] else
        f"{_f(c['faster'], '')} / {_f(c['smaller'], '')}",
    } for c in compares]
    print_table(table, [("batch", "batch", "s"), ("cameras", "cameras", "s"),
                        ("v", "vlakit ms (spread)", "s"), ("l", "LeRobot ms (spread)", "s"),
                        ("r", "ms ratio", "s"), ("cl", "vlakit clone / LeRobot", "s"),
                        ("fr", "FLOP ratio (here / 18 layers)", "s"),
                        ("eff", "ms ratio / FLOP ratio", "s"),
                        ("vp", "vlakit peak MiB", "s"), ("lp", "LeRobot peak MiB", "s"),
                        ("rp", "peak ratio", "s"), ("vr", "vlakit resident MiB", "s"),
                        ("lr", "LeRobot resident MiB", "s"), ("rr", "resident ratio", "s"),
                        ("d", "max |diff| actions", "s"),
                        ("goal", "faster / smaller", "s")])
    print("(FLOP ratio: vlakit's FLOPs / LeRobot's for this chunk, at these depths and at "
          "pi0's 18 layers / 27 blocks; ms ratio / FLOP ratio < 1: vlakit does the same work "
          "faster; peak: growth over one call; resident: what the worker holds after the "
          "calls over what it held after its imports)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--layers", type=int, default=2,
                   help="Gemma-2B and expert layers (18: pi0)")
    p.add_argument("--vision-layers", type=int, default=2, help="SigLIP blocks (27: pi0)")
    p.add_argument("--vocab", type=int, default=16384,
                   help="PaliGemma vocabulary (257152: pi0's; slower LeRobot loads)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cameras", type=int, nargs="+", default=[1, 3])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--variants", nargs="+", default=["eager"], choices=VARIANTS,
                   help="for the cache mode: eager, compiled (compile_for_inference and the "
                        "expert), graph (one CUDA graph of predict_action; CUDA only)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compiled variant (e.g. reduce-overhead)")
    p.add_argument("--max-batch", nargs="*", default=["rerun=1", "clone=1", "pruned=1"],
                   metavar="MODE=N",
                   help="run MODE only at batches up to N (default: rerun=1 clone=1 "
                        "pruned=1; no value: every mode at every batch)")
    p.add_argument("--keep-ratio", type=float, default=0.25,
                   help="TopKPruner(keep_ratio=...) of the pruned mode")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per callable (>= 1: the first one's actions are compared)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per callable (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads on both sides (default: one per core)")
    p.add_argument("--lerobot-python", default=None,
                   help="a LeRobot 0.6.1 interpreter: compare with its PI0Policy")
    p.add_argument("--lerobot-dir", default=None,
                   help="reuse a directory written by _lerobot_pi0.py save (same sizes)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile-parts", default="model", choices=["model", "expert"],
                   help="compiled variant: the whole model (compile_for_inference and the "
                        "expert) or the expert alone (the 10-step loop; compiles faster)")
    p.add_argument("--no-validation", action="store_true",
                   help="vlakit.set_validation(False) in vlakit's worker (no value checks "
                        "that read back from the GPU)")
    args = p.parse_args()
    try:
        args.max_batch_ = {m: int(n) for m, n in (item.split("=") for item in args.max_batch)}
    except ValueError:
        p.error(f"--max-batch takes MODE=N items, got {args.max_batch}")
    if set(args.max_batch_) - set(MODES):
        p.error(f"--max-batch names modes of {MODES}, got {sorted(args.max_batch_)}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first untimed call gives the compared actions)")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.time()
    load_start = os.getloadavg()[0]
    device_name = (machine_name(args.device) if args.device.startswith("cuda")
                   else f"{cpu_model()} ({os.cpu_count()} cores)")
    print(f"machine: {device_name}; {args.threads} torch threads on both sides; load average "
          f"{load_start:.2f} at start", flush=True)
    print(f"pi0, real widths: Gemma-2B x {args.layers} layers, gemma_300m expert x "
          f"{args.layers}, SigLIP So400m x {args.vision_layers} blocks, vocabulary "
          f"{args.vocab}; {args.dtype} on {args.device}; chunk {CHUNK}, max_dim {MAX_DIM}, "
          f"{STEPS} steps, prompt {PROMPT}", flush=True)
    lerobot = None
    with tempfile.TemporaryDirectory(prefix="pi0bench_") as tmpdir:
        tmp = Path(tmpdir)
        checkpoint = args.lerobot_dir
        if args.lerobot_python and checkpoint is None:
            checkpoint = str(tmp / "lerobot_pi0")
            t0 = time.perf_counter()
            out = subprocess.run([args.lerobot_python, str(HERE / "_lerobot_pi0.py"), "save",
                                  checkpoint, *lerobot_sizes(args), "--cameras",
                                  str(max(args.cameras)), "--seed", str(args.seed)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"LeRobot could not build the policy:\n{out.stderr[-3000:]}")
            lerobot = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"LeRobot {lerobot['lerobot']} (torch {lerobot['torch']}, transformers "
                  f"{lerobot['transformers']}) built and saved PI0Policy "
                  f"({lerobot['params'] / 1e6:.0f}M parameters) in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        results = [run_config(b, c, args, tmp, checkpoint)
                   for b in args.batch for c in args.cameras]
    rows, compares = [], []
    for result in results:
        r, c = summarize(result, args)
        rows += r
        if c:
            compares.append(c)
    print_tables(rows, compares, args)
    infos = results[0]["infos"] if results else {}
    vinfo, linfo = infos.get("vlakit", {}), infos.get("LeRobot", {})
    if vinfo:
        print(f"\nvlakit: torch {vinfo['torch']}, {vinfo['params'] / 1e6:.0f}M parameters; "
              f"pruned: TopKPruner(keep_ratio={args.keep_ratio}) over the image tokens; "
              f"agreement: max |diff| <= {ATOL[args.dtype]:g} + {RTOL[args.dtype]:g} x "
              f"max |actions|")
    if linfo:
        print(f"LeRobot {linfo['lerobot']}: torch {linfo['torch']}, transformers "
              f"{linfo['transformers']}, {linfo['params'] / 1e6:.0f}M parameters (both LM "
              f"heads); patched in its subprocess only:")
        for patch in linfo["patches"]:
            print(f"  - {patch}")
    load_end = os.getloadavg()[0]
    elapsed = time.time() - started
    print(f"load average {load_end:.2f} at the end; wall {elapsed / 60:.1f} min")
    bad = [r for r in rows if r["agrees"] is False] + [c for c in compares if c["agrees"]
                                                        is False]
    tol = f"{ATOL[args.dtype]:g} + {RTOL[args.dtype]:g} x max |actions|"
    write_json(args.json, {
        "benchmark": "pi0", "machine": device_name, "device": args.device,
        "dtype": args.dtype, "threads": args.threads, "vlakit_torch": vinfo.get("torch"),
        "lerobot": {k: linfo.get(k) for k in ("lerobot", "torch", "transformers", "python",
                                              "params", "patches")} if linfo else None,
        "vlakit_params": vinfo.get("params"), "args": vars(args),
        "sizes": {"layers": args.layers, "vision_layers": args.vision_layers,
                  "vocab": args.vocab, "chunk": CHUNK, "max_dim": MAX_DIM, "steps": STEPS,
                  "prompt": PROMPT, "state_dim": STATE_DIM, "action_dim": ACTION_DIM,
                  "suffix": SUFFIX, "tokens_per_camera": PER_VIEW},
        "tolerance": tol, "load_average_start_end": [load_start, load_end],
        "wall_s": elapsed, "rows": rows, "lerobot_comparison": compares,
        "configs": [{k: r[k] for k in ("batch", "cameras", "wall_s", "load_average",
                                       "errors", "resident", "infos")} for r in results],
    })
    if bad:
        raise SystemExit(f"{len(bad)} row(s) disagree beyond {tol}: see the 'agrees' "
                         f"columns")


if __name__ == "__main__":
    main()
