"""Serving: vlakit's policy server under 1, 4 and 16 concurrent openpi clients on loopback,
with and without batching, and the wire's cost against an in-process call.

The policy: a small OpenVLA-OFT-shaped bundle built from vlakit blocks, two 224 px camera
views (HWC uint8, as openpi's clients send them), an 8-d proprio state and a prompt; a ViT
(patch 16, so 2 x 196 image tokens; width ``--vision-dim``, ``--vision-depth`` blocks), a
linear projector, a proprio projector and a Llama-shaped decoder (width ``--dim``,
``--layers`` layers); one bundle per head, the same seeded weights for the shared blocks,
a chunk of 8 x 7 actions (``vlakit.models.oft_head``):

- ``l1``: ``L1RegressionHead`` under OFT's ``BidirectionalMask`` (one pass);
- ``flow``: ``FlowMatchingHead`` (``--steps`` Euler steps), ``"parallel"`` attention
  (the prefix is cached, each step runs the suffix);
- ``diffusion``: ``DiffusionActionHead`` (``--steps`` DDIM steps, cached likewise).

Each bundle is saved (``PolicyBundle.save``) and served by two server processes started
with the real command line (``vlakit.serve.command.main``, i.e. ``python -m vlakit.serve
DIR``), after ``torch.set_num_threads(--threads)`` (2: both cores):

- ``one by one``: ``--max-batch 1`` (a request never waits for others);
- ``batched``: ``--max-batch 16 --batch-window-ms --window-ms``.

The clients are unmodified ``openpi_client.websocket_client_policy.WebsocketClientPolicy``
instances, one thread each, in this process (the servers run in their own processes, so
the clients' GIL does not serialise the model; the clients do share the machine's two
cores with the server, as loopback clients do). Each run: every client sends one untimed
request, then all start together and each sends ``--requests`` requests in a closed loop
(the next one when the last answer arrived; ``--single-requests`` for the single client).
Measured at the client: the latency of every request (send to actions decoded), the
chunks per second of all clients together (requests / wall time of the run) and the
p50 / p99 latency; from each response's ``server_timing``: the per-stage medians (decode,
queue, preprocess, prefix, steps, postprocess, encode, infer) and the batch size. The two
servers take turns run by run (the order alternating between repeats), so that load from
other processes on this shared machine falls on both alike; chunks/s is the median of the
``--repeats`` runs (with their min-max), latencies are pooled over the repeats.

Wire overhead (batch 1, the one-by-one server, one client): the client's latency takes
turns call by call with the same observation through ``bundle(obs)`` in this process (the
saved bundle loaded back, the same thread count); ``wire`` is the client's latency minus
the server's ``infer_ms`` (what the worker's batch took: preprocess + model + postprocess),
request by request, which leaves the client's encode, the loopback transfers, the server's
decode, checks, hand-offs and encode, and the client's decode. The codec alone is timed
too: openpi-client's ``Packer.pack`` of the observation, vlakit's ``unpackb`` of it,
vlakit's ``packb`` of a real response and openpi-client's ``unpackb`` of that.

Goals (the serving issue): wire + codec <= 10 % of a chunk's latency at batch 1; batching
at 16 clients >= 3x the chunks/s of the one-by-one server, at a p99 within 2x of the
single-client latency (the one-by-one server's p50 at one client; the p99 / p99 ratio is
printed too).

OpenMP: unless ``OMP_WAIT_POLICY`` is already set, this script sets it to ``PASSIVE`` for
itself and the servers. On this shared 2-core machine, with other processes running,
OpenMP's default spin-waiting at 2 threads made a prediction several times slower (an
L1 predict: ~1.5-3.6 s instead of ~0.2 s at load 5); ``OMP_WAIT_POLICY=ACTIVE python
benchmarks/serving.py`` runs with spinning.

    python benchmarks/serving.py                                 # CPU, the default run
    python benchmarks/serving.py --heads l1 --clients 1,16 --repeats 1 --requests 4  # quick
    python benchmarks/serving.py --json benchmarks/results/serving-cpu.json
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import argparse  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import connect_when_listening, machine_name, print_table, write_json  # noqa: E402

from vlakit.actions import ActionNormalizer  # noqa: E402
from vlakit.bundle import ObservationKeys, PolicyBundle  # noqa: E402
from vlakit.decoders import llama  # noqa: E402
from vlakit.models import oft_head, openvla_oft  # noqa: E402
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer  # noqa: E402
from vlakit.projectors import LinearProjector, ProprioProjector  # noqa: E402
from vlakit.serve import packb, unpackb  # noqa: E402
from vlakit.vision import vit  # noqa: E402

HEADS = ("l1", "flow", "diffusion")
KEYS = ObservationKeys(images=("observation/image", "observation/wrist_image"),
                       state="observation/state", prompt="prompt")
TASKS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
         "open the top drawer and put the bowl inside", "turn on the stove",
         "put the cream cheese in the bowl"]
PATCH, PROPRIO, CHUNK, ACTION = 16, 8, 8, 7
MODES = ("one by one", "batched")
WIRE_GOAL, SPEEDUP_GOAL, P99_GOAL = 0.10, 3.0, 2.0
STAGES = ("decode_ms", "queue_ms", "preprocess_ms", "prefix_ms", "steps_ms", "postprocess_ms",
          "encode_ms", "infer_ms")
# the server process: the thread count first, then the real command line
CHILD = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
         "from vlakit.serve.command import main; sys.exit(main(sys.argv[2:]))")


# -- the policy ----------------------------------------------------------------------------


def build_bundle(head: str, args) -> PolicyBundle:
    """The OFT-shaped policy with ``head``; the shared blocks are seeded alike."""
    torch.manual_seed(0)
    attention = "bidirectional" if head == "l1" else "parallel"
    encoder = vit(img_size=args.image_size, patch_size=PATCH, dim=args.vision_dim,
                  depth=args.vision_depth, num_heads=max(1, args.vision_dim // 64),
                  mlp_dim=4 * args.vision_dim)
    decoder = llama(vocab_size=128, dim=args.dim, num_layers=args.layers,
                    num_heads=max(1, args.dim // 64), mlp_dim=args.mlp_dim)
    projector = LinearProjector(args.vision_dim, args.dim)
    proprio = ProprioProjector(PROPRIO, args.dim)
    torch.manual_seed(1)
    model = openvla_oft(
        encoder=encoder, projector=projector, decoder=decoder, proprio_projector=proprio,
        head=oft_head(head, args.dim, CHUNK, ACTION, attention,
                      num_inference_steps=None if head == "l1" else args.steps),
        attention=attention,
        action_normalizer=ActionNormalizer({"q01": [-1.0] * ACTION, "q99": [1.0] * ACTION}),
        proprio_normalizer=ActionNormalizer({"q01": [-1.0] * PROPRIO, "q99": [1.0] * PROPRIO},
                                            name="proprio"),
        num_views=2,
    ).eval()
    processor = OpenVLAProcessor.from_model(word_tokenizer([OPENVLA_PROMPT, *TASKS]), model)
    return PolicyBundle(model, processor, KEYS)


def observation(seed: int, size: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/state": rng.uniform(-1, 1, PROPRIO).astype(np.float32),
            "prompt": TASKS[seed % len(TASKS)]}


# -- the servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vlakit serve DIR`` in a child process on a free loopback port."""

    def __init__(self, path: Path, threads: int, window_ms: float, max_batch: int,
                 log: Path, device: str = "cpu", dtype: str = "float32") -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "VLAKIT_TYPECHECK": "0"}
        self._log_file = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(threads), str(path), "--host", "127.0.0.1",
             "--port", str(self.port), "--batch-window-ms", str(window_ms),
             "--max-batch", str(max_batch), "--device", device, "--dtype", dtype],
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def connect(self, count: int, timeout: float = 180.0) -> list:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        first = connect_when_listening(self.port, self.process, timeout, lambda: (
            f"the server did not start; its log:\n{self.log.read_text()[-3000:]}"))
        return [first] + [WebsocketClientPolicy("127.0.0.1", self.port)
                          for _ in range(count - 1)]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log_file.close()


def close_clients(clients: list) -> None:
    for client in clients:
        try:
            client._ws.close()  # openpi-client has no close(); its connection does
        except Exception:  # noqa: BLE001 - already gone
            pass


# -- measuring -----------------------------------------------------------------------------


def run_clients(clients: list, observations: list, requests: int) -> dict:
    """Every client: one untimed request, then ``requests`` in a closed loop, all starting
    together. Returns the wall time and every request's (latency ms, server_timing)."""
    count = len(clients)
    barrier = threading.Barrier(count + 1)
    records: list[list] = [[] for _ in range(count)]
    ends = [0.0] * count
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        client, obs = clients[i], observations[i]
        try:
            client.infer(obs)
            barrier.wait()
            for _ in range(requests):
                start = time.perf_counter()
                response = client.infer(obs)
                records[i].append(((time.perf_counter() - start) * 1000,
                                   response["server_timing"]))
            ends[i] = time.perf_counter()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {"wall_s": max(ends) - start,
            "records": [r for per_client in records for r in per_client]}


def wire_turns(bundle: PolicyBundle, client, obs: dict, calls: int) -> dict:
    """In-process ``bundle(obs)`` and the client's request, taking turns call by call."""
    for _ in range(2):
        with torch.inference_mode():
            bundle(obs)
        client.infer(obs)
    local, remote = [], []
    for _ in range(calls):
        start = time.perf_counter()
        with torch.inference_mode():
            bundle(obs)
        local.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        response = client.infer(obs)
        remote.append(((time.perf_counter() - start) * 1000, response["server_timing"]))
    return {"local_ms": local, "records": remote, "response": response}


def codec_ms(obs: dict, response: dict, repeats: int = 200) -> dict:
    """The four codec steps of one request, each the median of ``repeats`` calls in turns."""
    from openpi_client import msgpack_numpy

    packer = msgpack_numpy.Packer()
    frame, answer = packer.pack(obs), packb(response)
    steps = {
        "client_pack": lambda: packer.pack(obs),
        "server_unpack": lambda: unpackb(frame),
        "server_pack": lambda: packb(response),
        "client_unpack": lambda: msgpack_numpy.unpackb(answer),
    }
    times: dict[str, list] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["total"] = sum(out.values())
    out["request_bytes"], out["response_bytes"] = len(frame), len(answer)
    return out


def stage_medians(records: list) -> dict:
    timings = [t for _, t in records]
    out = {}
    for stage in STAGES:
        if stage == "encode_ms":  # reported with the next response on that connection
            values = [t["prev_encode_ms"] for t in timings if t["prev_total_ms"] > 0]
        else:
            values = [t[stage] for t in timings]
        out[stage] = statistics.median(values) if values else float("nan")
    out["wire_ms"] = statistics.median(lat - t["infer_ms"] for lat, t in records)
    out["batch_mean"] = statistics.fmean(t["batch_size"] for t in timings)
    out["batch_max"] = max(t["batch_size"] for t in timings)
    return out


def summarise(runs: list[dict]) -> dict:
    """Runs of one (head, server, clients) over the repeats."""
    rates = [len(r["records"]) / r["wall_s"] for r in runs]
    records = [rec for r in runs for rec in r["records"]]
    latencies = np.array([lat for lat, _ in records])
    p50s = [float(np.percentile([lat for lat, _ in r["records"]], 50)) for r in runs]
    return {"chunks_per_s": statistics.median(rates), "chunks_per_s_min": min(rates),
            "chunks_per_s_max": max(rates), "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "p50_min": min(p50s),
            "p50_max": max(p50s), "samples": len(latencies), **stage_medians(records)}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def bench_head(head: str, args, workdir: Path) -> dict:
    bundle = build_bundle(head, args)
    path = bundle.save(workdir / head)
    params = sum(p.numel() for p in bundle.model.parameters())
    prompt_tokens = int(bundle.inputs([observation(0, args.image_size)]).input_ids.shape[1])
    most = max(args.clients)
    servers = {
        "one by one": Server(path, args.threads, 0.0, 1, workdir / f"{head}-single.log",
                             args.device, args.dtype),
        "batched": Server(path, args.threads, args.window_ms, args.max_batch,
                          workdir / f"{head}-batched.log", args.device, args.dtype),
    }
    try:
        clients = {mode: server.connect(most) for mode, server in servers.items()}
        local = PolicyBundle.load(path, device=args.device,  # what the servers serve
                                  dtype=getattr(torch, args.dtype))
        observations = [observation(i, args.image_size) for i in range(most)]
        runs: dict[tuple, list] = {}
        turns = {"local_ms": [], "records": []}
        response = None
        for repeat in range(args.repeats):
            got = wire_turns(local, clients["one by one"][0], observations[0],
                             args.single_requests)
            turns["local_ms"] += got["local_ms"]
            turns["records"] += got["records"]
            response = got["response"]
            order = MODES if repeat % 2 == 0 else MODES[::-1]
            for count in args.clients:
                requests = args.single_requests if count == 1 else args.requests
                for mode in order:
                    run = run_clients(clients[mode][:count], observations[:count], requests)
                    runs.setdefault((mode, count), []).append(run)
            print(f"  {head}: repeat {repeat + 1}/{args.repeats} done (load {load_average()})",
                  file=sys.stderr)
        for per_mode in clients.values():
            close_clients(per_mode)
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for (mode, count), per in sorted(runs.items(),
                                  key=lambda kv: (kv[0][1], MODES.index(kv[0][0]))):
        rows.append({"head": head, "clients": count, "server": mode, **summarise(per)})
    codec = codec_ms(observations[0], response)
    lat = np.array([lat for lat, _ in turns["records"]])
    wire = [lat - t["infer_ms"] for lat, t in turns["records"]]
    inproc = statistics.median(turns["local_ms"])
    p50 = float(np.percentile(lat, 50))
    overhead = {
        "head": head, "in_process_ms": inproc, "client_p50_ms": p50,
        "server_infer_ms": statistics.median(t["infer_ms"] for _, t in turns["records"]),
        "model_ms": statistics.median(t["model_ms"] for _, t in turns["records"]),
        "wire_ms": statistics.median(wire), "vs_in_process_ms": p50 - inproc,
        "codec_ms": codec["total"], "wire_share": statistics.median(wire) / p50,
        "vs_in_process_share": (p50 - inproc) / p50, "codec_share": codec["total"] / p50,
        "samples": len(lat),
    }
    overhead["goal_met"] = bool(overhead["wire_share"] <= WIRE_GOAL)
    return {"head": head, "params": params, "prompt_tokens": prompt_tokens, "rows": rows,
            "overhead": overhead, "codec": codec}


def goals(result: dict, args) -> dict | None:
    rows = {(r["server"], r["clients"]): r for r in result["rows"]}
    most = max(args.clients)
    if ("one by one", 1) not in rows or most == 1:
        return None
    single, one = rows[("one by one", 1)], rows[("one by one", most)]
    batched = rows[("batched", most)]
    speedup = batched["chunks_per_s"] / one["chunks_per_s"]
    p99_ratio = batched["p99_ms"] / single["p50_ms"]
    return {"head": result["head"], "clients": most, "one_by_one_chunks_per_s":
            one["chunks_per_s"], "batched_chunks_per_s": batched["chunks_per_s"],
            "speedup": speedup, "speedup_met": bool(speedup >= SPEEDUP_GOAL),
            "single_p50_ms": single["p50_ms"], "single_p99_ms": single["p99_ms"],
            "batched_p99_ms": batched["p99_ms"], "p99_vs_single_p50": p99_ratio,
            "p99_vs_single_p99": batched["p99_ms"] / single["p99_ms"],
            "p99_met": bool(p99_ratio <= P99_GOAL),
            "one_by_one_p99_ms": one["p99_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default=",".join(HEADS),
                        help=f"comma-separated, of {', '.join(HEADS)}")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=6,
                        help="timed requests per client per run (several clients)")
    parser.add_argument("--single-requests", type=int, default=16,
                        help="timed requests of the single client per run, and wire/in-process "
                        "turns per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="the servers' and the in-process "
                        "bundle's (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the served parameters' dtype (vlakit serve --dtype)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, server and here")
    parser.add_argument("--window-ms", type=float, default=5.0,
                        help="the batched server's --batch-window-ms")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's")
    parser.add_argument("--image-size", type=int, default=224,
                        help="camera images (square, both views), a multiple of 16")
    parser.add_argument("--vision-dim", type=int, default=192)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256, help="decoder width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--mlp-dim", type=int, default=704, help="decoder MLP width")
    parser.add_argument("--steps", type=int, default=10, help="flow / diffusion steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in args.heads if h not in HEADS]
    if unknown:
        raise SystemExit(f"unknown heads {unknown}; choose from {HEADS}")
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="vlakit-serving-") as tmp:
        for head in args.heads:
            results.append(bench_head(head, args, Path(tmp)))
    wall = time.perf_counter() - started
    machine = machine_name(args.device)
    print(f"machine: {machine}; {args.device}; torch {torch.__version__}; {args.dtype}; "
          f"torch threads "
          f"{args.threads} in each server process and here; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}; load average {load_before} before, "
          f"{load_average()} after; wall {wall:.0f} s")
    size, tokens = args.image_size, 2 * (args.image_size // PATCH) ** 2
    print(f"policy: 2 views {size}x{size} uint8 HWC, ViT patch {PATCH} ({tokens} image "
          f"tokens) width {args.vision_dim} x {args.vision_depth} blocks; Llama width "
          f"{args.dim} x {args.layers} layers, MLP {args.mlp_dim}; proprio {PROPRIO}; chunk "
          f"{CHUNK} x {ACTION}; flow / diffusion {args.steps} steps (prefix cached); "
          + ", ".join(f"{r['head']} {r['params'] / 1e6:.1f} M params" for r in results)
          + f"; prompt {results[0]['prompt_tokens']} ids")
    print(f"servers: one by one = --max-batch 1; batched = --max-batch {args.max_batch} "
          f"--batch-window-ms {args.window_ms:g}; clients: openpi-client threads here, "
          f"{args.requests} requests each ({args.single_requests} for one client) x "
          f"{args.repeats} repeats, the two servers in turns")
    rows = [r for res in results for r in res["rows"]]
    for r in rows:
        r["rate"] = (f"{r['chunks_per_s']:.2f} ({r['chunks_per_s_min']:.2f}-"
                     f"{r['chunks_per_s_max']:.2f})")
    print("\nthroughput and latency per chunk (chunks/s: median of the repeats, min-max; "
          "latency pooled):")
    print_table(rows, [
        ("head", "head", "s"), ("clients", "clients", "d"), ("server", "server", "s"),
        ("rate", "chunks/s", "s"), ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"),
        ("samples", "n", "d"), ("batch_mean", "mean batch", ".1f"),
        ("batch_max", "max batch", "d"),
    ])
    print("\nper-stage medians from server_timing (ms; wire = client latency - infer):")
    print_table(rows, [
        ("head", "head", "s"), ("clients", "clients", "d"), ("server", "server", "s"),
        ("decode_ms", "decode", ".2f"), ("queue_ms", "queue", ".1f"),
        ("preprocess_ms", "preprocess", ".1f"), ("prefix_ms", "prefix", ".1f"),
        ("steps_ms", "steps", ".1f"), ("postprocess_ms", "post", ".2f"),
        ("encode_ms", "encode", ".2f"), ("infer_ms", "infer", ".1f"),
        ("wire_ms", "wire", ".1f"),
    ])
    overheads = [res["overhead"] for res in results]
    for o in overheads:
        o["met"] = "yes" if o["goal_met"] else "NO"
    print(f"\nwire overhead at batch 1 (one client, one-by-one server, in turns with an "
          f"in-process bundle(obs); goal: wire + codec <= {WIRE_GOAL:.0%} of the latency):")
    print_table(overheads, [
        ("head", "head", "s"), ("in_process_ms", "in-process ms", ".1f"),
        ("client_p50_ms", "client p50 ms", ".1f"), ("server_infer_ms", "server infer ms", ".1f"),
        ("model_ms", "model ms", ".1f"), ("wire_ms", "wire ms", ".2f"),
        ("vs_in_process_ms", "client - in-process ms", ".2f"), ("codec_ms", "codec ms", ".2f"),
        ("wire_share", "wire / latency", ".1%"),
        ("vs_in_process_share", "(client - in-proc) / latency", ".1%"),
        ("codec_share", "codec / latency", ".2%"), ("met", "goal met", "s"),
    ])
    codec = results[0]["codec"]
    print(f"codec alone ({results[0]['head']}): client pack {codec['client_pack']:.3f} ms, "
          f"server unpack {codec['server_unpack']:.3f} ms, server pack "
          f"{codec['server_pack']:.3f} ms, client unpack {codec['client_unpack']:.3f} ms; "
          f"request {codec['request_bytes']} B, response {codec['response_bytes']} B")
    checks = [g for g in (goals(res, args) for res in results) if g is not None]
    if checks:
        for g in checks:
            g["speedup_ok"] = "yes" if g["speedup_met"] else "NO"
            g["p99_ok"] = "yes" if g["p99_met"] else "NO"
        print(f"\nbatching at {checks[0]['clients']} clients (goals: >= {SPEEDUP_GOAL:g}x the "
              f"one-by-one chunks/s; p99 <= {P99_GOAL:g}x the single-client p50):")
        print_table(checks, [
            ("head", "head", "s"), ("one_by_one_chunks_per_s", "one by one chunks/s", ".2f"),
            ("batched_chunks_per_s", "batched chunks/s", ".2f"), ("speedup", "speed-up", ".2f"),
            ("speedup_ok", "met", "s"), ("single_p50_ms", "1-client p50 ms", ".1f"),
            ("batched_p99_ms", "batched p99 ms", ".1f"),
            ("p99_vs_single_p50", "p99 / 1-client p50", ".2f"),
            ("p99_vs_single_p99", "p99 / 1-client p99", ".2f"), ("p99_ok", "met", "s"),
        ])
    write_json(args.json, {
        "machine": machine, "device": args.device, "torch": torch.__version__,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_before": load_before,
        "load_after": load_average(), "wall_s": wall,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "image_size": args.image_size, "image_tokens": 2 * (args.image_size // PATCH) ** 2,
        "chunk": [CHUNK, ACTION],
        "params": {res["head"]: res["params"] for res in results},
        "prompt_tokens": results[0]["prompt_tokens"],
        "rows": [{k: v for k, v in r.items() if k != "rate"} for r in rows],
        "overhead": [{k: v for k, v in o.items() if k != "met"} for o in overheads],
        "codec": {res["head"]: res["codec"] for res in results},
        "goals": [{k: v for k, v in g.items() if not k.endswith("_ok")} for g in checks],
    })


if __name__ == "__main__":
    main()
