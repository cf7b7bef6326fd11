"""LeRobot's side of ``benchmarks/pi0.py``, and the worker protocol both sides speak.

This file runs inside LeRobot's interpreter (``lerobot[pi]``; it imports nothing of vlakit)
and is also imported by ``benchmarks/pi0.py`` for the protocol and memory helpers (torch
only: LeRobot is imported inside the functions that need it). ``pi0.py`` drives it; by
hand:

    LEROBOT=/work/lerobot-venv/bin/python
    $LEROBOT benchmarks/_lerobot_pi0.py save /tmp/pi0dir --layers 2 --vision-layers 2 \\
        --vocab 257152 --cameras 3
    $LEROBOT benchmarks/_lerobot_pi0.py serve /tmp/pi0dir inputs.safetensors --layers 2 \\
        --vision-layers 2 --vocab 257152 --threads 2      # then JSON commands on stdin

``save`` builds LeRobot's own ``PI0Policy`` with random weights (the constant-valued ones,
Gemma's zero RMSNorm weights, given a little noise so that they matter) and writes it with
``save_pretrained``: the directory vlakit's ``load_pi0`` reads. ``serve`` loads it back
with ``PI0Policy.from_pretrained`` and times ``policy.model.sample_actions(images,
img_masks, tokens, masks, state, noise=...)`` on the inputs ``pi0.py`` wrote.

LeRobot picks every size by variant name (``PI0Config`` accepts only ``"gemma_2b"`` and
``"gemma_300m"``) and hard-codes the vision tower and the vocabulary, so a reduced-depth
model needs three patches, applied in this process only (``install_patches``), with the
real widths kept:

- ``lerobot.policies.pi0.modeling_pi0.get_gemma_config``: ``gemma_2b`` and ``gemma_300m``
  at their published widths, heads and MLPs, with ``depth=--layers``;
- ``modeling_pi0.PaliGemmaForConditionalGenerationWithPiGemma``: a subclass that sets the
  SigLIP tower's ``num_hidden_layers`` to ``--vision-layers`` (width 1152, 16 heads, MLP
  4304, 224 px stay) and, only when ``--vocab`` is not 257152, the vocabulary and image
  token id;
- ``modeling_pi0.PiGemmaForCausalLM``: the action expert's (never read) vocabulary, only
  when ``--vocab`` is not 257152.

Protocol: the worker prints one JSON line ``{"ready": true, ...}`` after loading, then
reads one JSON command per line on stdin and answers each with one JSON line on its
original stdout (everything else the process prints goes to stderr):
``{"op": "run", "name": N}`` -> ``{"ms": ...}`` (one timed call); ``{"op": "save", "name":
N, "path": P}`` -> one timed call whose actions are written to ``P`` (safetensors,
``actions``); ``{"op": "mem", "name": N}`` -> ``{"mib": ...}`` (peak memory growth over one
call, see ``peak_growth_mib``); ``{"op": "resident"}`` -> ``{"mib": ...}`` (what the process
holds over what it held after its imports: the weights, touched, and whatever the calls
left); ``{"op": "quit"}``. A failing command answers
``{"error": "..."}``.
"""

import argparse
import ctypes
import gc
import json
import os
import sys
import time
import traceback

import torch

FULL_VOCAB = 257152
GEMMA_2B = dict(width=2048, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = dict(width=1024, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
PATCHES = (
    "lerobot.policies.pi0.modeling_pi0.get_gemma_config -> gemma_2b / gemma_300m at their "
    "real widths with depth=--layers",
    "modeling_pi0.PaliGemmaForConditionalGenerationWithPiGemma -> subclass setting SigLIP's "
    "num_hidden_layers=--vision-layers (and the vocabulary, when --vocab != 257152)",
    "modeling_pi0.PiGemmaForCausalLM -> subclass with the expert's vocabulary = --vocab "
    "(only when --vocab != 257152)",
)


# -- memory and the protocol (shared with pi0.py's vlakit worker) ----------------------------


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
    return _LIBC


def release_freed() -> None:
    """Collect garbage and hand glibc's free heap pages back (``malloc_trim(0)``), so that
    resident memory counts live tensors and a later reuse of those pages counts again."""
    gc.collect()
    _libc().malloc_trim(0)


def fix_mmap_threshold() -> None:
    """glibc: every allocation of 64 KiB or more mmapped and unmapped on free (no dynamic
    threshold, no trim threshold), so resident-set growth tracks live memory. Set after the
    timed calls (it adds page faults) and before the memory calls."""
    libc = _libc()
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


def peak_growth_mib(fn, device: str) -> float:
    """Peak memory growth (MiB) over one call of ``fn()``: on CUDA the allocator's peak over
    what was allocated before; on CPU the resident set's high-water mark (``VmHWM``, reset
    through ``/proc/self/clear_refs``) over the resident set before the call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    release_freed()
    base = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    fn()
    return status_mib("VmHWM") - base


def protocol_stream():
    """The original stdout for protocol lines; fd 1 (and ``sys.stdout``) go to stderr, so
    that whatever libraries print cannot corrupt the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def resident_mib(device: str) -> float:
    """What the process holds now: the resident set (CPU, after ``release_freed``) or the
    allocator's allocated bytes (CUDA), in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    release_freed()
    return status_mib("VmRSS")


def serve(proto, calls: dict, info: dict, device: str, base: float = 0.0,
          memory: dict | None = None) -> None:
    """Answer the parent's commands (see the module docstring) until ``quit``. ``base``:
    ``resident_mib`` before the model was built (after the imports); ``memory``: peak MiB
    known in advance for some callables (a CUDA graph's capture), answered to ``mem``
    instead of a measurement."""

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return out, (time.perf_counter() - start) * 1000

    send({"ready": True, **info})
    memory_mode = False
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        op = msg["op"]
        if op == "quit":
            break
        if op == "resident":
            send({"mib": resident_mib(device) - base})
            continue
        try:
            fn = calls[msg["name"]]
            if op == "run":
                _, ms = timed(fn)
                send({"ms": ms, "load": os.getloadavg()[0]})
            elif op == "save":
                from safetensors.torch import save_file

                out, ms = timed(fn)
                save_file({"actions": out.detach().float().cpu().contiguous()}, msg["path"])
                send({"ms": ms})
            elif op == "mem" and memory and msg["name"] in memory:
                send({"mib": memory[msg["name"]]})
            elif op == "mem":
                if not memory_mode and not device.startswith("cuda"):
                    release_freed()
                    fix_mmap_threshold()
                    memory_mode = True
                send({"mib": peak_growth_mib(fn, device)})
            else:
                send({"error": f"unknown op {op!r}"})
        except Exception as error:  # reported in the table, not raised
            traceback.print_exc()
            send({"error": f"{type(error).__name__}: {error}"[:2000]})
    proto.close()


# -- LeRobot: patches, build and save, serve ---------------------------------------------------


def install_patches(layers: int, vision_layers: int, vocab: int) -> None:
    """Reduced depth (and optionally vocabulary) at real widths, in this process only."""
    from lerobot.policies.pi0 import modeling_pi0 as mod

    config_cls = mod.GemmaConfig

    def get_gemma_config(variant: str):
        sizes = {"gemma_2b": GEMMA_2B, "gemma_300m": GEMMA_300M}
        if variant not in sizes:
            raise ValueError(f"Unknown variant: {variant}")
        return config_cls(depth=layers, **sizes[variant])

    mod.get_gemma_config = get_gemma_config
    base_pali = mod.PaliGemmaForConditionalGenerationWithPiGemma
    base_expert = mod.PiGemmaForCausalLM

    class Pali(base_pali):
        def __init__(self, config):
            config.vision_config.num_hidden_layers = vision_layers
            if vocab != FULL_VOCAB:
                config._vocab_size = vocab
                config.image_token_index = vocab
                config.text_config.vocab_size = vocab
            super().__init__(config)

    class Expert(base_expert):
        def __init__(self, config, **kwargs):
            if vocab != FULL_VOCAB:
                config.vocab_size = vocab
            super().__init__(config, **kwargs)

    Pali.__name__, Expert.__name__ = base_pali.__name__, base_expert.__name__
    mod.PaliGemmaForConditionalGenerationWithPiGemma = Pali
    mod.PiGemmaForCausalLM = Expert


def _config(args):
    from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.pi0 import PI0Config

    size = (3, args.img_size, args.img_size)
    features = {f"observation.images.camera_{i}": PolicyFeature(type=FeatureType.VISUAL,
                                                                shape=size)
                for i in range(args.cameras)}
    features["observation.state"] = PolicyFeature(type=FeatureType.STATE,
                                                  shape=(args.state_dim,))
    identity = NormalizationMode.IDENTITY  # the benchmark feeds normalised state, reads raw
    return PI0Config(
        input_features=features,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION,
                                                 shape=(args.action_dim,))},
        chunk_size=args.chunk, n_action_steps=args.chunk, num_inference_steps=args.steps,
        image_resolution=(args.img_size, args.img_size), tokenizer_max_length=args.prompt,
        device=args.device, dtype=args.dtype,
        normalization_mapping={"VISUAL": identity, "STATE": identity, "ACTION": identity},
    )


def _randomize_constants(policy, seed: int) -> None:
    """Noise on every constant-valued parameter (Gemma's RMSNorm weights start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.numel() == 1 or float(p.float().std()) == 0.0:
                p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.device, p.dtype))


def _versions() -> dict:
    import importlib.metadata as md

    return {"torch": torch.__version__, "transformers": md.version("transformers"),
            "lerobot": md.version("lerobot"), "python": sys.version.split()[0]}


def save(args) -> None:
    install_patches(args.layers, args.vision_layers, args.vocab)
    from lerobot.policies.pi0 import PI0Policy

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    policy = PI0Policy(_config(args))
    _randomize_constants(policy, args.seed)
    built = time.perf_counter() - start
    policy.save_pretrained(args.dir)
    params = sum(p.numel() for p in policy.parameters())
    print(json.dumps({"params": params, "build_s": built,
                      "save_s": time.perf_counter() - start - built, **_versions()}))


def serve_lerobot(args) -> None:
    proto = protocol_stream()
    if args.threads:
        torch.set_num_threads(args.threads)
    install_patches(args.layers, args.vision_layers, args.vocab)
    import torch.nn.functional as F
    from lerobot.policies.pi0 import PI0Policy
    from safetensors.torch import load_file

    base = resident_mib(args.device)

    start = time.perf_counter()
    policy = PI0Policy.from_pretrained(args.dir).eval()
    load_s = time.perf_counter() - start
    device = next(policy.parameters()).device
    inputs = {k: v.to(device) for k, v in load_file(args.inputs).items()}
    b, views = inputs["images"].shape[:2]
    images = [inputs["images"][:, i] for i in range(views)]
    img_masks = [torch.ones(b, dtype=torch.bool, device=device)] * views
    config = policy.config
    state = F.pad(inputs["state"], (0, config.max_state_dim - inputs["state"].shape[-1]))
    action_dim = config.output_features["action"].shape[0]

    def sample():
        with torch.no_grad():
            actions = policy.model.sample_actions(images, img_masks, inputs["tokens"],
                                                  inputs["masks"], state,
                                                  noise=inputs["noise"].clone())
        return actions[:, :, :action_dim]

    info = {"params": sum(p.numel() for p in policy.parameters()), "load_s": load_s,
            "loaded_mib": resident_mib(args.device) - base, "threads": torch.get_num_threads(),
            "patches": list(PATCHES), **_versions()}
    serve(proto, {"sample_actions": sample}, info, str(device), base=base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("save", "serve"):
        s = sub.add_parser(name)
        s.add_argument("dir")
        if name == "serve":
            s.add_argument("inputs")
            s.add_argument("--threads", type=int, default=None)
        s.add_argument("--layers", type=int, required=True)
        s.add_argument("--vision-layers", type=int, required=True)
        s.add_argument("--vocab", type=int, default=FULL_VOCAB)
        s.add_argument("--cameras", type=int, default=3)
        s.add_argument("--img-size", type=int, default=224)
        s.add_argument("--state-dim", type=int, default=8)
        s.add_argument("--action-dim", type=int, default=7)
        s.add_argument("--chunk", type=int, default=50)
        s.add_argument("--steps", type=int, default=10)
        s.add_argument("--prompt", type=int, default=48)
        s.add_argument("--device", default="cpu")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        s.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.command == "save":
        save(args)
    else:
        serve_lerobot(args)


if __name__ == "__main__":
    main()
