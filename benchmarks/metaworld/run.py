"""Meta-World closed loop: scripted-expert demonstrations -> a LeRobot v3 folder -> a tiny
vlakit VLA trained with the library's recipe (``vlakit train``) -> evaluated through the
policy server (``vlakit serve``) with the real ``openpi-client``, beside a small-CNN
behaviour-cloning baseline trained for the same CPU time and the scripted expert itself.

    python benchmarks/metaworld/run.py all        # collect, train, evaluate, report (~80 min)
    python benchmarks/metaworld/run.py collect    # 100 demonstrations per task (~7 min)
    python benchmarks/metaworld/run.py train      # the VLA (12000 steps), then the baseline
    python benchmarks/metaworld/run.py eval       # 50 held-out episodes per task and policy
    python benchmarks/metaworld/run.py eval --policies vla   # one policy
    python benchmarks/metaworld/run.py report     # the table, report.json, success.png
    python benchmarks/metaworld/run.py smoke --work /tmp/mw   # seconds: the test suite's

Everything lands under ``--work`` (default ``benchmarks/metaworld/runs``): ``demos/`` (the
dataset), ``vla/`` (the recipe's output; ``vla/policy`` is the bundle the server loads),
``baseline.pt``, one JSON per step (``collect.json``, ``train.json``, ``eval-expert.json``,
``eval-vla.json``, ``eval-baseline.json``), and ``report.json`` and ``success.png``.

Evaluation: each task on held-out layout seeds (``--eval-seed`` onwards; the demonstrations
use seeds ``0 .. episodes - 1``), every policy on the same seeds, an episode a success as
soon as Meta-World's ``info["success"]`` is set within ``env.MAX_STEPS`` steps. The VLA
re-plans every ``--replan`` steps (default 1: a new chunk each step, its first action
executed); real-time chunking is off (the server answers within one control step here).
"""

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder's banner: errors only
# OpenMP's spin-waiting made 2-thread steps 5-15x slower whenever another process held a
# core of this shared 2-core machine (measured: 0.17 s -> 1-2.5 s per training step)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# before any OSMesa context: torch's optimisers import triton, whose libtriton carries its
# own LLVM; loaded after OSMesa's llvmpipe (LLVM too) has rendered, it segfaults (measured)
import torch._dynamo  # noqa: E402, F401

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this folder's modules, benchmarks/_common
from _common import connect_when_listening  # noqa: E402
from collect import collect_episodes  # noqa: E402
from env import TASKS, expert_success, make_env  # noqa: E402

CAMERA = "observation.images.corner"
FPS = 80  # Meta-World's control rate (frame skip 5 at 2.5 ms)


# -- demonstrations ------------------------------------------------------------------------


def collect(work: Path, episodes: int, noise: float, tasks: list[str]) -> dict:
    """Expert demonstrations of every task as one LeRobot v3 folder ``work/demos``."""
    from vlakit.data import LeRobotWriter

    if (work / "demos").exists():
        raise SystemExit(f"{work / 'demos'} exists: remove it to collect again, or give "
                         f"another --work")
    features = {CAMERA: {"dtype": "video", "shape": [64, 64, 3]},
                "observation.state": {"dtype": "float32", "shape": [39]},
                "action": {"dtype": "float32", "shape": [4]}}
    started, counts = time.perf_counter(), {}
    with LeRobotWriter(work / "demos", fps=FPS, features=features, robot_type="sawyer",
                       video_options={"crf": "10", "g": "2"}) as writer:
        for task in tasks:
            kept = 0
            for episode in collect_episodes(task, range(episodes), action_noise=noise):
                writer.add_episode({CAMERA: episode["image"],
                                    "observation.state": episode["state"],
                                    "action": episode["action"]}, task=episode["instruction"])
                kept += 1
            counts[task] = kept
            print(f"{task}: {kept}/{episodes} successful demonstrations", flush=True)
    return {"episodes": counts, "noise": noise, "seconds": time.perf_counter() - started}


# -- training ------------------------------------------------------------------------------


def _warmup(steps: int) -> int:
    return min(200, steps // 10)


def train_vla(work: Path, steps: int, batch: int, lr: float, chunk: int) -> dict:
    """``vlakit train --model policy:build`` on the demonstrations (a child process)."""
    command = [sys.executable, "-m", "vlakit", "train", "--model", "policy:build",
               "--data", str(work / "demos"), "--chunk", str(chunk), "--preload",
               "--steps", str(steps), "--batch", str(batch), "--lr", str(lr),
               "--warmup", str(_warmup(steps)), "--out", str(work / "vla")]
    print("$", " ".join(command), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, cwd=HERE, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"command": " ".join(command[1:]), "wall_s": time.perf_counter() - started,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def train_baseline(work: Path, cpu_seconds: float, batch: int, lr: float, chunk: int,
                   warmup: int) -> dict:
    """The small-CNN baseline until it has used ``cpu_seconds`` of CPU time (the VLA's
    whole ``vlakit train`` process: start-up, loading and saving included; the baseline's
    clock starts before its own loading too), on the same data, batch and normalisation,
    with the VLA's schedule: AdamW, ``warmup`` steps of linear warm-up, then cosine decay
    to zero over the CPU budget (the fraction of it spent, since its step count is not
    known in advance). CPU time rather than wall time, so that load from other processes
    on this shared machine favours neither."""
    from policy import ConvBC

    from vlakit.actions import ActionNormalizer
    from vlakit.data import LeRobotDataset

    started, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    data = LeRobotDataset(work / "demos", chunk_size=chunk, preload=True)
    stats = data.statistics()
    tasks = sorted(set(data.tasks.values()))
    model = ConvBC(data.state_dim, data.action_dim, chunk, len(tasks),
                   ActionNormalizer.from_stats(stats),
                   ActionNormalizer.from_stats(stats, key="proprio"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    index = {t: i for i, t in enumerate(tasks)}
    steps, losses = 0, []
    while (spent := time.process_time() - cpu) < cpu_seconds:
        scale = min(1.0, (steps + 1) / max(warmup, 1)) * 0.5 * (
            1 + math.cos(math.pi * spent / cpu_seconds))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        picks = torch.randint(len(data), (batch,), generator=generator).tolist()
        samples = [data[i] for i in picks]
        loss = model.loss(torch.stack([s["images"][0] for s in samples]),
                          torch.stack([s["proprio"] for s in samples]),
                          torch.tensor([index[s["instruction"]] for s in samples]),
                          torch.stack([s["actions"] for s in samples]),
                          torch.stack([s["action_is_pad"] for s in samples]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        losses.append(float(loss.detach()))
    torch.save({"state_dict": model.state_dict(), "tasks": tasks, "chunk": chunk,
                "state_dim": data.state_dim, "action_dim": data.action_dim,
                "stats": stats}, work / "baseline.pt")
    return {"steps": steps, "wall_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu, "params": sum(p.numel() for p in
                                                               model.parameters()),
            "first_loss": losses[0], "last_loss": float(np.mean(losses[-50:]))}


# -- evaluation ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedPolicy:
    """The VLA behind ``vlakit serve`` (a child process), queried with openpi-client."""

    def __init__(self, bundle: Path, log, threads: int = 1) -> None:
        self.port = _free_port()
        code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
                "from vlakit.cli import main; sys.exit(main(sys.argv[2:]))")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(threads), "serve", str(bundle), "--host",
             "127.0.0.1", "--port", str(self.port)], env={**os.environ, "VLAKIT_TYPECHECK": "0"},
            stdout=log, stderr=subprocess.STDOUT)
        self.client = connect_when_listening(self.port, self.process, 120, lambda: (
            f"vlakit serve {bundle} did not start (its log: {log.name})"))
        self.metadata = self.client.get_server_metadata()
        self.keys = self.metadata["observation_keys"]

    def __call__(self, obs: dict, instruction: str) -> np.ndarray:
        request = {self.keys["images"][0]: obs["image"], self.keys["state"]: obs["state"],
                   self.keys["prompt"]: instruction}
        return self.client.infer(request)["actions"]  # [chunk, 4]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class BaselinePolicy:
    """The baseline in this process."""

    def __init__(self, path: Path) -> None:
        from policy import ConvBC

        from vlakit.actions import ActionNormalizer

        saved = torch.load(path, weights_only=False)
        self.model = ConvBC(saved["state_dim"], saved["action_dim"], saved["chunk"],
                            len(saved["tasks"]), ActionNormalizer.from_stats(saved["stats"]),
                            ActionNormalizer.from_stats(saved["stats"], key="proprio"))
        self.model.load_state_dict(saved["state_dict"])
        self.model.eval()
        self.index = {t: i for i, t in enumerate(saved["tasks"])}

    def __call__(self, obs: dict, instruction: str) -> np.ndarray:
        image = torch.from_numpy(obs["image"]).permute(2, 0, 1)[None]
        state = torch.from_numpy(obs["state"])[None]
        return self.model.act(image, state, torch.tensor([self.index[instruction]]))[0].numpy()


def run_episode(env, policy, seed: int, replan: int) -> tuple[bool, int]:
    """One closed-loop episode: a new chunk every ``replan`` steps."""
    obs = env.reset(seed=seed)
    chunk, used = None, 0
    for t in range(1, env.max_steps + 1):
        if chunk is None or used >= min(replan, len(chunk)):
            chunk, used = policy(obs, env.instruction), 0
        obs, _, success, _ = env.step(chunk[used])
        used += 1
        if success:
            return True, t
    return False, env.max_steps


def evaluate(policy, tasks: list[str], seeds: range, replan: int, name: str) -> dict:
    out = {}
    for task in tasks:
        env = make_env(task)
        started = time.perf_counter()
        results = [run_episode(env, policy, seed, replan) for seed in seeds]
        env.close()
        out[task] = {"success": float(np.mean([ok for ok, _ in results])),
                     "episodes": len(results),
                     "median_steps": float(np.median([t for ok, t in results if ok]))
                     if any(ok for ok, _ in results) else None,
                     "seconds": time.perf_counter() - started}
        print(f"{name} {task}: {out[task]['success']:.0%} of {len(results)} "
              f"({out[task]['seconds']:.0f} s)", flush=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["expert"])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.27
    for k, name in enumerate(("expert", "vla", "baseline")):
        values = [100 * report[name][t]["success"] for t in tasks]
        ax.bar(np.arange(len(tasks)) + (k - 1) * width, values, width,
               label={"expert": "scripted expert", "vla": "vlakit VLA (served)",
                      "baseline": "small-CNN BC"}[name])
    ax.set_xticks(np.arange(len(tasks)), [t.removesuffix("-v3") for t in tasks], fontsize=8)
    ax.set_ylabel("success %")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"Meta-World, {report['episodes']} held-out seeds per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- commands ------------------------------------------------------------------------------


def _save(work: Path, name: str, value: dict) -> None:
    (work / f"{name}.json").write_text(json.dumps(value, indent=1))


def _load(work: Path, name: str) -> dict:
    file = work / f"{name}.json"
    if not file.is_file():
        raise SystemExit(f"{file} is missing: run the step that writes it first")
    return json.loads(file.read_text())


def report(work: Path) -> dict:
    """Combine the steps' files into ``report.json`` and ``success.png``; print the table."""
    out = {"collect": _load(work, "collect"),
           "train": {"vla": _load(work, "train-vla"), "baseline": _load(work, "train-baseline")}}
    for name in ("expert", "vla", "baseline"):
        out[name] = _load(work, f"eval-{name}")
    tasks = list(out["expert"]["tasks"])
    out["episodes"] = out["vla"]["episodes"]
    print("| task | expert | vlakit VLA (served) | small-CNN BC |\n|---|---:|---:|---:|")
    for task in tasks:
        print(f"| {task} | " + " | ".join(f"{out[n]['tasks'][task]['success']:.0%}"
                                          for n in ("expert", "vla", "baseline")) + " |")
    means = {n: float(np.mean([out[n]["tasks"][t]["success"] for t in tasks]))
             for n in ("expert", "vla", "baseline")}
    out["means"] = means
    out["vla_over_expert"] = means["vla"] / max(means["expert"], 1e-9)
    print(f"| mean | {means['expert']:.1%} | {means['vla']:.1%} | {means['baseline']:.1%} |")
    print(f"VLA / expert: {out['vla_over_expert']:.1%}")
    plot({n: out[n]["tasks"] for n in ("expert", "vla", "baseline")} |
         {"episodes": out["episodes"]}, work / "success.png")
    _save(work, "report", out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command",
                        choices=("collect", "train", "eval", "report", "all", "smoke"))
    parser.add_argument("--work", type=Path, default=HERE / "runs")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--episodes", type=int, default=100, help="demonstrations per task")
    parser.add_argument("--eval-episodes", type=int, default=50,
                        help="held-out episodes per task")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="std of the Gaussian noise on the executed expert actions")
    parser.add_argument("--steps", type=int, default=12_000, help="VLA optimiser steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--replan", type=int, default=1,
                        help="actions of each chunk executed before the next request")
    parser.add_argument("--eval-seed", type=int, default=10_000)
    parser.add_argument("--policies", default="expert,vla,baseline",
                        help="which to train (train: vla, baseline) or evaluate (eval)")
    args = parser.parse_args(argv)
    if args.replan < 1:
        parser.error(f"--replan {args.replan}: execute at least 1 action per chunk")
    if args.eval_seed < args.episodes:
        parser.error(f"--eval-seed {args.eval_seed} overlaps the demonstrations' seeds "
                     f"0..{args.episodes - 1}: evaluation layouts must be held out")
    tasks = args.tasks.split(",")
    work = args.work.resolve()  # the recipe runs in this folder: absolute paths
    if args.command == "smoke":
        args.episodes, args.eval_episodes, args.steps = 1, 1, 3
        tasks = tasks[:1]
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    steps = {"collect", "train", "eval", "report"} if args.command in ("all", "smoke") \
        else {args.command}
    if "collect" in steps:
        _save(work, "collect", collect(work, args.episodes, args.noise, tasks))
    if "train" in steps:
        which = args.policies.split(",")
        if "vla" in which:
            _save(work, "train-vla", train_vla(work, args.steps, args.batch, args.lr,
                                               args.chunk))
        if "baseline" in which:
            budget = 2.0 if args.command == "smoke" else _load(work, "train-vla")["cpu_s"]
            _save(work, "train-baseline", train_baseline(work, budget, args.batch, args.lr,
                                                         args.chunk, _warmup(args.steps)))
    if "eval" in steps:
        seeds = range(args.eval_seed, args.eval_seed + args.eval_episodes)
        for name in args.policies.split(","):
            _save(work, f"eval-{name}", {"episodes": args.eval_episodes,
                                         "replan": args.replan, "seeds": [seeds.start,
                                                                          seeds.stop],
                                         "tasks": evaluate_policy(name, work, tasks, seeds,
                                                                  args.replan)})
    if "report" in steps:
        report(work)


def evaluate_policy(name: str, work: Path, tasks: list[str], seeds: range,
                    replan: int) -> dict:
    """Success per task of the expert, the served VLA or the in-process baseline."""
    if name == "expert":
        out = {}
        for task in tasks:
            measured = expert_success(task, seeds)
            out[task] = {"success": measured["success_rate"], "episodes": measured["n"],
                         "median_steps": measured["median_steps"]}
        return out
    if name == "vla":
        with open(work / "serve.log", "w") as log:
            served = ServedPolicy(work / "vla" / "policy", log)
            try:
                return evaluate(served, tasks, seeds, replan, "vla")
            finally:
                served.close()
    if name == "baseline":
        return evaluate(BaselinePolicy(work / "baseline.pt"), tasks, seeds, replan, "baseline")
    raise SystemExit(f"--policies: unknown policy {name!r} (expert, vla, baseline)")


if __name__ == "__main__":
    main()
