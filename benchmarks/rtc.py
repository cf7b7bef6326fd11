"""Real-time chunking: a latency-delay sweep of four ways to switch action chunks.

The task (fully synthetic): a point in ``--action-dim`` (2) dimensions follows a smooth
target trajectory, per dimension a sum of two sinusoids with random amplitudes
(0.15-0.5), angular frequencies (0.05-0.2 rad per control step: periods of 31-126 steps)
and phases. The action at step ``t`` is the commanded position; the target position
``y_t`` is known to the evaluator. The policy observes the target's last ``--history`` (6)
positions, ``y_{t-K} .. y_{t-1}``, with sensor noise (sd 0.005, drawn once per episode and
time step, so every request that sees a step sees the same reading), and predicts the next
``H`` (16) actions ``y_t .. y_{t+H-1}``. The near future is pinned down by the history, the
far end of the chunk is not: the policy is a stochastic forecaster, so two chunks sampled
``s`` steps apart need not agree where they overlap, which is the situation real-time
chunking addresses (on Kinetix the disagreement comes from multimodal demonstrations).

The policy: a tiny vlakit VLA with a [FlowMatchingHead][vlakit.heads.FlowMatchingHead]
(chunk 16, 10 Euler steps, the cached layout under ``ParallelDecodingMask``): the
observation enters through the proprio projector (one ``PROPRIO`` token, the ``K x a``
positions flattened); the image is a constant black 28 px view through a one-block ViT and
the prompt two constant tokens (neither carries information). Decoder: Llama-shaped, width
64, 2 layers. It is trained here with flow matching on freshly drawn trajectories
(``--train-steps`` AdamW steps, one-cycle schedule; about 3 minutes on one CPU thread) and
cached (``--cache``, default a file in the system's temporary directory keyed by the
training configuration; ``--retrain`` ignores it). Its chunk error per index is printed
next to constant-velocity extrapolation from the last two readings, for scale.

Execution (discrete time, ``--steps`` (104) control steps per episode, ``--episodes`` (128)
episodes in one batch, the same episodes and sensor noise for every mode and delay). The
first chunk is requested at step 0 and executed from its first action in every mode. ``d``
is the inference delay in control steps, ``s`` the execution horizon (default ``H / 2`` = 8
for every ``d``, so that ``d <= s <= H - d`` holds over the whole sweep ``d = 0 .. H/2``).
A request at step ``t_r`` sees the observation at ``t_r`` (history up to ``t_r - 1``), so
the new chunk's action ``i`` is meant for step ``t_r + i`` and its first ``d`` actions are
stale when it arrives at ``t_r + d``.

- ``sync`` (synchronous, waiting): after ``s`` actions of a chunk the robot requests the
  next one and *holds its last action* for the ``d`` steps of inference while the target
  keeps moving; the new chunk then runs from its action ``d`` (the one meant for the
  arrival step: the best a latency-aware synchronous robot can do in a world that does not
  wait) for ``s`` actions. Every cycle is ``s + d`` steps, ``d`` of them held.
- ``naive`` (asynchronous, no RTC): what [ChunkExecutor][vlakit.serve.ChunkExecutor] does
  with ``rtc=False``: after ``s`` actions the request goes out and the robot keeps
  executing the old chunk (its actions ``s .. s + d - 1``); when the new chunk arrives, its
  first ``d`` actions are dropped and execution continues from its action ``d``. A cycle is
  ``s`` steps.
- ``guided``: the same schedule, the new chunk sampled with
  ``GuidedRTC(leftover, delay=d, execution_horizon=s)`` (the paper's guided inpainting; the
  leftover is the old chunk's ``H - s`` unexecuted actions; ``--schedule`` exp,
  ``--beta`` 10).
- ``inpaint``: the same schedule with ``InpaintRTC(leftover, frozen=d, overlap=H - s)``
  (GR00T N1.7's inpainting, ``--ramp-rate`` 5).

Every request draws its initial noise from ``Sampling(generator=Generator().manual_seed(
seed + request index))``: ``naive``, ``guided`` and ``inpaint`` send their requests at the
same steps with the same observations and the same noise, so their differences are paired
(``sync`` requests at other steps). At ``d = 0`` ``sync`` and ``naive`` are the same run.

Metrics per (mode, d), over ``--episodes`` episodes:

- tracking error: the mean over steps and dimensions of ``|a_t - y_t|``; mean and standard
  deviation over episodes, and the paired difference to ``naive`` (mean and 95 % interval,
  ``1.96`` standard errors over episodes);
- boundary jump: ``max_dim |a_t - a_{t-1}|`` at each switch step (the first step that runs
  an action of a new chunk; for ``sync`` the step after the hold): mean over all switches of
  all episodes, and the maximum;
- the same step size inside chunks (every other step, held steps left out), and the
  target's own step ``max_dim |y_t - y_{t-1}|`` (printed once), for scale;
- how closely a new chunk follows the leftover it overlaps (async modes): the mean
  ``|new - leftover|`` over its first ``d`` actions (inpainting: 0 by construction; naive:
  the policy's own disagreement) and over all ``H - s`` overlapping actions.

    python benchmarks/rtc.py                                   # train (or load), sweep, table
    python benchmarks/rtc.py --json benchmarks/results/rtc-cpu.json \\
        --plot benchmarks/results/rtc-cpu.png
    python benchmarks/rtc.py --delays 0 4 8 --episodes 32      # quicker
    python benchmarks/rtc.py --retrain --train-steps 3000      # a better policy
    python benchmarks/rtc.py --plot-from benchmarks/results/rtc-cpu.json \\
        --plot benchmarks/results/rtc-cpu.png                  # redraw only

The anchor: vla-eval's Kinetix sweep, where naive asynchronous switching's success falls
from 56 % to 40 % once the delay reaches the control step, and the RTC paper's Kinetix
result that RTC holds up with delay where naive switching does not.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_name, print_table, write_json  # noqa: E402

from vlakit import VLA, VLAInputs  # noqa: E402
from vlakit.core import ParallelDecodingMask  # noqa: E402
from vlakit.decoders import llama  # noqa: E402
from vlakit.heads import FlowMatchingHead, Sampling  # noqa: E402
from vlakit.heads.rtc import GuidedRTC, InpaintRTC  # noqa: E402
from vlakit.interleave import PrefixInterleaver  # noqa: E402
from vlakit.projectors import LinearProjector, ProprioProjector  # noqa: E402
from vlakit.vision import vit  # noqa: E402

MODES = ("sync", "naive", "guided", "inpaint")
LABELS = {"sync": "synchronous (hold)", "naive": "naive async", "guided": "guided RTC",
          "inpaint": "inpainting RTC"}
COMPONENTS = 2  # sinusoids per dimension
AMP = (0.15, 0.5)
OMEGA = (0.05, 0.2)  # rad per control step
IMG = 28


# -- the task ----------------------------------------------------------------------------------

def trajectories(batch: int, start: int, stop: int, action_dim: int,
                 g: torch.Generator) -> torch.Tensor:
    """Target positions ``[batch, stop - start, a]`` at steps ``start .. stop - 1``."""
    omega = torch.rand(batch, COMPONENTS, action_dim, generator=g) * (OMEGA[1] - OMEGA[0])
    amp = torch.rand(batch, COMPONENTS, action_dim, generator=g) * (AMP[1] - AMP[0])
    phase = torch.rand(batch, COMPONENTS, action_dim, generator=g) * 2 * math.pi
    omega, amp = omega + OMEGA[0], amp + AMP[0]
    t = torch.arange(start, stop, dtype=torch.float32)[None, None, :, None]
    return (amp[:, :, None] * torch.sin(omega[:, :, None] * t + phase[:, :, None])).sum(1)


def model_inputs(obs: torch.Tensor, actions: torch.Tensor | None = None) -> VLAInputs:
    """The observation ``[b, K a]`` as the proprio token; a constant image and prompt."""
    b = obs.shape[0]
    return VLAInputs(input_ids=torch.full((b, 2), 5), text_valid=torch.ones(b, 2, dtype=torch.bool),
                     pixels=torch.zeros(b, 1, 3, IMG, IMG), proprio=obs, actions=actions)


def training_batch(args, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k, h = args.history, args.chunk
    y = trajectories(args.batch, -k, h, args.action_dim, g)
    obs = y[:, :k] + args.obs_noise * torch.randn(args.batch, k, args.action_dim, generator=g)
    return obs.reshape(args.batch, -1), y[:, k:]


# -- the policy --------------------------------------------------------------------------------

def build_policy(args) -> VLA:
    torch.manual_seed(args.seed)
    d = args.dim
    return VLA(
        vit(img_size=IMG, patch_size=14, dim=32, depth=1, num_heads=2, mlp_dim=64),
        LinearProjector(32, d), PrefixInterleaver(bos_id=1, eos_id=2),
        llama(vocab_size=128, dim=d, num_layers=args.layers, num_heads=4, mlp_dim=2 * d),
        ParallelDecodingMask(),
        head=FlowMatchingHead(d, args.action_dim, args.chunk, num_steps=args.flow_steps),
        proprio_projector=ProprioProjector(args.history * args.action_dim, d),
    )


TRAIN_KEYS = ("chunk", "action_dim", "history", "obs_noise", "dim", "layers", "flow_steps",
              "train_steps", "batch", "lr", "seed")


def cache_path(args) -> str:
    if args.cache:
        return args.cache
    config = {k: getattr(args, k) for k in TRAIN_KEYS}
    config["task"] = [COMPONENTS, AMP, OMEGA, IMG]
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "vlakit-bench-rtc", f"policy-{key}.pt")


def train_or_load(args) -> tuple[VLA, dict]:
    model = build_policy(args)
    path = cache_path(args)
    if os.path.exists(path) and not args.retrain:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        info = dict(saved["info"], cached=True, path=path)
        print(f"policy: loaded {path} (trained {info['steps']} steps in "
              f"{info['seconds']:.0f} s, final loss {info['final_loss']:.4f})", flush=True)
        return model.eval(), info
    print(f"policy: training {args.train_steps} steps, batch {args.batch} ...", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr,
                                                total_steps=args.train_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(args.train_steps):
        obs, actions = training_batch(args, g)
        loss = model(model_inputs(obs, actions), sampling=Sampling(generator=g)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, args.train_steps // 5) == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"  step {step + 1}: loss {recent:.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    tail = losses[-100:]
    info = {"steps": args.train_steps, "seconds": time.perf_counter() - start,
            "final_loss": sum(tail) / len(tail), "first_loss": losses[0]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    print(f"policy: trained in {info['seconds']:.0f} s, saved {path}", flush=True)
    return model.eval(), dict(info, cached=False, path=path)


def policy_quality(model: VLA, args) -> dict:
    """Mean |error| of one sampled chunk per index on fresh trajectories, the spread between
    two samples, and constant-velocity extrapolation from the last two readings."""
    g = torch.Generator().manual_seed(args.seed + 7)
    k, h, n = args.history, args.chunk, 256
    y = trajectories(n, -k, h, args.action_dim, g)
    obs = y[:, :k] + args.obs_noise * torch.randn(n, k, args.action_dim, generator=g)
    target = y[:, k:]
    a = model.predict_action(model_inputs(obs.reshape(n, -1)),
                             Sampling(generator=torch.Generator().manual_seed(1)))
    b = model.predict_action(model_inputs(obs.reshape(n, -1)),
                             Sampling(generator=torch.Generator().manual_seed(2)))
    steps = torch.arange(1, h + 1, dtype=torch.float32)[None, :, None]
    extrapolated = obs[:, -1:] + steps * (obs[:, -1:] - obs[:, -2:-1])
    return {
        "policy_error": (a - target).abs().mean((0, 2)).tolist(),
        "sample_spread": (a - b).abs().mean((0, 2)).tolist(),
        "const_velocity_error": (extrapolated - target).abs().mean((0, 2)).tolist(),
        "hold_last_error": (obs[:, -1:] - target).abs().mean((0, 2)).tolist(),
    }


# -- execution ---------------------------------------------------------------------------------

class Episodes:
    """``--episodes`` targets and sensor readings, shared by every mode and delay."""

    def __init__(self, args) -> None:
        g = torch.Generator().manual_seed(args.seed + 1)
        self.k, self.steps = args.history, args.steps
        n, a = args.episodes, args.action_dim
        self.y = trajectories(n, -self.k, args.steps + args.chunk, a, g)  # index t + K
        self.readings = self.y + args.obs_noise * torch.randn(self.y.shape, generator=g)

    def observe(self, t: int) -> torch.Tensor:
        """The readings of steps ``t - K .. t - 1``, flattened ``[n, K a]``."""
        return self.readings[:, t:t + self.k].reshape(self.readings.shape[0], -1)

    def target(self) -> torch.Tensor:
        """``y_t`` for ``t = 0 .. steps - 1``, ``[n, steps, a]``."""
        return self.y[:, self.k:self.k + self.steps]


def simulate(model: VLA, episodes: Episodes, mode: str, d: int, args) -> dict:
    """One mode at one delay: the executed actions ``[n, steps, a]`` and where chunks
    switched."""
    s, h, steps = args.exec_horizon, args.chunk, args.steps
    requests, latencies = 0, []
    prefix_gaps: list[float] = []
    overlap_gaps: list[float] = []

    def request(t: int, wrapper=None) -> torch.Tensor:
        nonlocal requests
        sampling = Sampling(generator=torch.Generator().manual_seed(args.seed * 100_003 + requests),
                            step_wrapper=wrapper)
        requests += 1
        start = time.perf_counter()
        chunk = model.predict_action(model_inputs(episodes.observe(t)), sampling,
                                     unnormalize=False)
        latencies.append(time.perf_counter() - start)
        return chunk

    n, a = episodes.y.shape[0], episodes.y.shape[2]
    acts = torch.empty(n, steps, a)
    held = torch.zeros(steps, dtype=torch.bool)
    switches: list[int] = []
    chunk, index, used = request(0), 0, 0
    pending: tuple[torch.Tensor, int] | None = None
    for t in range(steps):
        for _ in range(2):  # an arrival first; with d = 0 a request made now arrives now
            if pending is not None and t == pending[1]:
                chunk, index, used, pending = pending[0], d, 0, None
                switches.append(t)
            # sync: s actions of this chunk ran; async: the chunk's index reached s (as
            # ChunkExecutor: the d actions run during inference count towards it)
            if pending is None and (used if mode == "sync" else index) >= s:
                wrapper = None
                leftover = chunk[:, index:]  # the H - s actions not yet executed
                if mode == "guided":
                    wrapper = GuidedRTC(leftover, delay=d, execution_horizon=s,
                                        schedule=args.schedule, max_guidance_weight=args.beta)
                elif mode == "inpaint":
                    wrapper = InpaintRTC(leftover, frozen=d, overlap=leftover.shape[1],
                                         ramp_rate=args.ramp_rate)
                pending = (request(t, wrapper), t + d)
                if mode != "sync":  # how far the new chunk is from the leftover it overlaps
                    gap = (pending[0][:, :leftover.shape[1]] - leftover).abs()
                    overlap_gaps.append(gap.mean().item())
                    if d:
                        prefix_gaps.append(gap[:, :d].mean().item())
        if mode == "sync" and pending is not None:
            acts[:, t] = acts[:, t - 1]  # waiting: hold the last action
            held[t] = True
            continue
        assert index < h, (mode, d, t, index)
        acts[:, t] = chunk[:, index]
        index += 1
        used += 1
    nan = float("nan")
    return {"actions": acts, "switches": switches, "held": held, "requests": requests,
            "prefix_gap": sum(prefix_gaps) / len(prefix_gaps) if prefix_gaps else nan,
            "overlap_gap": sum(overlap_gaps) / len(overlap_gaps) if overlap_gaps else nan,
            "ms_per_request": 1000 * sum(latencies[1:]) / max(1, len(latencies) - 1)}


def metrics(run: dict, target: torch.Tensor) -> dict:
    acts = run["actions"]
    err = (acts - target).abs().mean((1, 2))  # [n]
    step = (acts[:, 1:] - acts[:, :-1]).abs().amax(-1)  # [n, steps - 1]: step t is index t - 1
    switches = [t for t in run["switches"] if t >= 1]
    jumps = step[:, [t - 1 for t in switches]] if switches else torch.zeros(acts.shape[0], 0)
    inside = torch.ones(step.shape[1], dtype=torch.bool)
    for t in switches:
        inside[t - 1] = False
    inside &= ~run["held"][1:]
    return {
        "err_per_episode": err,
        "tracking_error": err.mean().item(),
        "tracking_error_sd": err.std().item(),
        "boundary_jump_mean": jumps.mean().item() if jumps.numel() else float("nan"),
        "boundary_jump_max": jumps.max().item() if jumps.numel() else float("nan"),
        "boundary_jump_p95": jumps.flatten().quantile(0.95).item() if jumps.numel()
        else float("nan"),
        "inside_step_mean": step[:, inside].mean().item(),
        "switches": len(switches),
        "held_steps": int(run["held"].sum()),
        "requests": run["requests"],
        "prefix_gap": run["prefix_gap"],
        "overlap_gap": run["overlap_gap"],
        "ms_per_request": run["ms_per_request"],
    }


# -- output ------------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def print_results(rows: list[dict], reference: dict) -> None:
    print()
    print(f"target's own step max_dim |y_t - y_(t-1)|: mean {reference['target_step_mean']:.4f}, "
          f"max {reference['target_step_max']:.4f}")
    table = [{
        "d": str(r["d"]), "mode": LABELS[r["mode"]],
        "err": f"{r['tracking_error']:.4f} ± {r['tracking_error_sd']:.4f}",
        "diff": "-" if r["mode"] == "naive" else
        f"{r['diff_vs_naive']:+.4f} ± {r['diff_vs_naive_ci95']:.4f}",
        "jmean": _fmt(r["boundary_jump_mean"], ".4f"),
        "jp95": _fmt(r["boundary_jump_p95"], ".4f"),
        "jmax": _fmt(r["boundary_jump_max"], ".4f"),
        "inside": _fmt(r["inside_step_mean"], ".4f"),
        "sw": f"{r['switches']}/{r['held_steps']}",
        "pgap": _fmt(r["prefix_gap"], ".4f"), "ogap": _fmt(r["overlap_gap"], ".4f"),
        "ms": _fmt(r["ms_per_request"], ".0f"),
    } for r in rows]
    print_table(table, [("d", "d", "s"), ("mode", "mode", "s"),
                        ("err", "tracking err (mean ± sd)", "s"),
                        ("diff", "vs naive (± 95%)", "s"),
                        ("jmean", "boundary jump mean", "s"), ("jp95", "jump p95", "s"),
                        ("jmax", "jump max", "s"), ("inside", "in-chunk step mean", "s"),
                        ("sw", "switches/held steps", "s"),
                        ("pgap", "new[:d] vs leftover", "s"),
                        ("ogap", "new[:H-s] vs leftover", "s"), ("ms", "ms/request", "s")])


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ref, a = payload["rows"], payload["reference"], payload["args"]
    delays = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("tracking_error", "tracking error  mean |a_t - y_t|"),
              ("boundary_jump_mean", "boundary jump, mean  max_dim |a_t - a_(t-1)|"),
              ("boundary_jump_max", "boundary jump, max over all switches")]
    styles = {"sync": "s-", "naive": "o-", "guided": "^-", "inpaint": "v-"}
    for ax, (key, title) in zip(axes.flat, panels):
        for mode in MODES:
            mine = sorted((r["d"], r) for r in rows if r["mode"] == mode)
            xs, ys = [d for d, _ in mine], [r[key] for _, r in mine]
            line, = ax.plot(xs, ys, styles[mode], label=LABELS[mode])
            if key == "tracking_error":
                se = [1.96 * r["tracking_error_sd"] / math.sqrt(a["episodes"]) for _, r in mine]
                ax.fill_between(xs, [y - e for y, e in zip(ys, se)],
                                [y + e for y, e in zip(ys, se)], alpha=0.15,
                                color=line.get_color())
        if key.startswith("boundary"):
            ref_key = "target_step_mean" if key.endswith("mean") else "target_step_max"
            ax.axhline(ref[ref_key], color="gray", ls="--", lw=1, label="target's own step")
        ax.set_xlabel("inference delay d (control steps)")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(delays)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[3]
    trace = payload.get("trace")
    if trace:
        ax.plot(trace["target"], color="black", lw=2, alpha=0.5, label="target")
        for mode in MODES:
            ax.plot(trace[mode], styles[mode][0] + "-", ms=2, lw=1, label=LABELS[mode])
        for t in trace["switches"]:
            ax.axvline(t, color="gray", lw=0.5, alpha=0.5)
        ax.set_title(f"episode 0, dimension 0, d = {trace['d']} (grey: async switches)",
                     fontsize=10)
        ax.set_xlabel("control step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"RTC delay sweep: H={a['chunk']}, s={a['exec_horizon']}, "
                 f"{a['episodes']} episodes x {a['steps']} steps, flow {a['flow_steps']} steps",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# -- main --------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunk", type=int, default=16, help="H, the chunk length")
    p.add_argument("--exec-horizon", type=int, default=None,
                   help="s, actions executed per chunk (default H/2)")
    p.add_argument("--delays", type=int, nargs="+", default=None,
                   help="inference delays d in control steps (default 0 .. H/2)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--episodes", type=int, default=128, help="episodes (one batch)")
    p.add_argument("--steps", type=int, default=104, help="control steps per episode")
    p.add_argument("--action-dim", type=int, default=2)
    p.add_argument("--history", type=int, default=6, help="K, past positions observed")
    p.add_argument("--obs-noise", type=float, default=0.005, help="sensor noise sd")
    p.add_argument("--flow-steps", type=int, default=10, help="Euler steps per chunk")
    p.add_argument("--beta", type=float, default=10.0, help="GuidedRTC max_guidance_weight")
    p.add_argument("--schedule", default="exp", help="GuidedRTC prefix-weight schedule")
    p.add_argument("--ramp-rate", type=float, default=5.0, help="InpaintRTC ramp_rate")
    p.add_argument("--dim", type=int, default=64, help="decoder width")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one cycle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None,
                   help="trained weights file (default: the system's temporary directory, "
                        "keyed by the training configuration)")
    p.add_argument("--retrain", action="store_true", help="train even if the cache exists")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine more "
                        "threads stall in OpenMP barriers; 0 = torch's choice)")
    p.add_argument("--trace-delay", type=int, default=None,
                   help="the delay of the example trace in the plot (default H/4)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write a PNG here")
    p.add_argument("--plot-from", default=None, help="redraw --plot from this JSON only")
    args = p.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            payload = json.load(f)
        print_results(payload["rows"], payload["reference"])
        if args.plot:
            plot(payload, args.plot)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    h = args.chunk
    args.exec_horizon = h // 2 if args.exec_horizon is None else args.exec_horizon
    s = args.exec_horizon
    args.delays = list(range(h // 2 + 1)) if args.delays is None else args.delays
    args.trace_delay = h // 4 if args.trace_delay is None else args.trace_delay
    for d in args.delays:
        if not 0 <= d <= s <= h - d:
            p.error(f"every delay needs d <= s <= H - d: d={d}, s={s}, H={h}")
    modes = [m for m in MODES if m in args.modes]
    if "naive" not in modes:
        modes.insert(1 if "sync" in modes else 0, "naive")  # the paired reference

    started = time.time()
    load_start = os.getloadavg()[0]
    print(f"machine: {machine_name('cpu')}; torch {torch.__version__}; load average "
          f"{load_start:.2f} at start", flush=True)
    print(f"task: {args.action_dim}-d sums of {COMPONENTS} sinusoids, history K={args.history}, "
          f"sensor noise {args.obs_noise}; H={h}, s={s}, delays {args.delays}; "
          f"{args.episodes} episodes x {args.steps} steps", flush=True)
    model, train_info = train_or_load(args)
    quality = policy_quality(model, args)
    idx = sorted({0, s // 2, s - 1, s, min(h - 1, s + max(args.delays) - 1), h - 1})
    print("chunk prediction, mean |error| at index " + ", ".join(map(str, idx)) + ":")
    for key, label in (("policy_error", "flow policy (one sample)"),
                       ("sample_spread", "two samples' |difference|"),
                       ("const_velocity_error", "constant-velocity extrapolation"),
                       ("hold_last_error", "holding the last reading")):
        print(f"  {label:32s}" + "  ".join(f"{quality[key][i]:.4f}" for i in idx))

    episodes = Episodes(args)
    target = episodes.target()
    tstep = (target[:, 1:] - target[:, :-1]).abs().amax(-1)
    reference = {"target_step_mean": tstep.mean().item(), "target_step_max": tstep.max().item()}
    rows, trace = [], None
    sim_start = time.perf_counter()
    for d in args.delays:
        t0 = time.perf_counter()
        runs = {mode: simulate(model, episodes, mode, d, args) for mode in modes}
        found = {mode: metrics(run, target) for mode, run in runs.items()}
        base = found["naive"]["err_per_episode"]
        for mode in modes:
            m = found[mode]
            diff = m.pop("err_per_episode") - base
            rows.append({"d": d, "s": s, "mode": mode, **m,
                         "diff_vs_naive": diff.mean().item(),
                         "diff_vs_naive_ci95": 1.96 * diff.std().item() / math.sqrt(len(diff))})
        if d == args.trace_delay:
            trace = {"d": d, "target": target[0, :, 0].tolist(),
                     "switches": runs["naive"]["switches"],
                     **{mode: runs[mode]["actions"][0, :, 0].tolist() for mode in modes}}
        summary = ", ".join(f"{mode} {found[mode]['tracking_error']:.4f}/"
                            f"{found[mode]['boundary_jump_mean']:.4f}" for mode in modes)
        print(f"d={d}: err/jump {summary} ({time.perf_counter() - t0:.0f} s)", flush=True)
    sim_s = time.perf_counter() - sim_start
    print_results(rows, reference)
    wall = time.time() - started
    load_end = os.getloadavg()[0]
    print(f"simulation {sim_s:.0f} s; load average {load_end:.2f} at the end; wall "
          f"{wall / 60:.1f} min")
    payload = {
        "benchmark": "rtc",
        "machine": machine_name("cpu"),
        "torch": torch.__version__,
        "args": vars(args),
        "task": {"components": COMPONENTS, "amplitude": AMP, "omega": OMEGA,
                 "observation": "the target's last K positions with sensor noise, through the "
                                "proprio projector; constant image and prompt"},
        "training": train_info,
        "policy_quality": quality,
        "reference": reference,
        "load_average_start_end": [load_start, load_end],
        "simulation_s": sim_s,
        "wall_s": wall,
        "rows": rows,
        "trace": trace,
    }
    write_json(args.json, payload)
    if args.plot:
        plot(payload, args.plot)


if __name__ == "__main__":
    main()
