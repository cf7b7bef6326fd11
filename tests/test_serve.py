"""vlakit's policy server against the unmodified openpi client (openpi-client 0.1.2 from the
package index): the wire, batching that every client cannot see, robustness, security,
timing, the command line, and the robot-side executor with real-time chunking."""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("websockets")
openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
from openpi_client import msgpack_numpy  # noqa: E402

from vlakit.bundle import ObservationKeys, PolicyBundle  # noqa: E402
from vlakit.heads import GuidedRTC, InpaintRTC, Sampling  # noqa: E402
from vlakit.serve import (  # noqa: E402
    ChunkExecutor,
    PolicyServer,
    WebsocketPolicy,
    packb,
    unpackb,
)

Client = openpi_client.WebsocketClientPolicy
KEYS = ObservationKeys(images=("observation/image", "observation/wrist_image"),
                       state="observation/state", prompt="prompt")
TASKS = ["pick up the red block", "open the drawer", "put the block in the box",
         "close the drawer now"]


def _bundle(head: str = "flow") -> PolicyBundle:
    from test_bundle import _model

    from vlakit.heads import DiffusionActionHead, L1RegressionHead
    from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer

    model = _model()
    if head == "l1":
        model.head = L1RegressionHead(64, action_dim=3, chunk_size=4)
    elif head == "diffusion":
        model.head = DiffusionActionHead(64, action_dim=3, chunk_size=4,
                                         num_inference_steps=3)
    model.eval()
    processor = OpenVLAProcessor.from_model(word_tokenizer([OPENVLA_PROMPT, *TASKS]), model)
    return PolicyBundle(model, processor, KEYS)


def _observation(seed: int = 0, task: str = TASKS[0]) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.standard_normal(5).astype(np.float32), "prompt": task}


class _Running:
    """A PolicyServer on a free loopback port, its event loop in a background thread."""

    def __init__(self, bundle: PolicyBundle, **options) -> None:
        options.setdefault("host", "127.0.0.1")
        options.setdefault("port", 0)
        self.server = PolicyServer(bundle, **options)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30)
        self.port = self.server.port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture
def served():
    running = []

    def start(bundle=None, **options):
        running.append(_Running(_bundle() if bundle is None else bundle, **options))
        return running[-1]

    yield start
    for server in running:
        server.close()


def test_the_openpi_client_gets_metadata_actions_and_timing(served):
    server = served()
    client = Client("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert meta["observation_keys"]["images"] == list(KEYS.images)
    assert meta["action_shape"] == [4, 3] and meta["chunk_size"] == 4
    assert meta["rtc_modes"] == ["guided", "inpaint"]
    response = client.infer({**_observation(), "sampling/seed": 3})
    actions = response["actions"]
    assert actions.shape == (4, 3) and actions.dtype == np.float32
    # exactly what the bundle gives in process with that seed
    want = server.server.bundle(_observation(), Sampling(generator=(
        torch.Generator().manual_seed(3),)))
    np.testing.assert_allclose(actions, want, atol=1e-6)
    timing = response["server_timing"]
    for stage in ("decode_ms", "queue_ms", "preprocess_ms", "model_ms", "prefix_ms",
                  "steps_ms", "postprocess_ms", "infer_ms", "prev_total_ms"):
        assert timing[stage] >= 0, stage
    assert timing["steps_ms"] > 0 and timing["batch_size"] == 1
    assert response["policy_timing"]["infer_ms"] == timing["model_ms"]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
        assert r.status == 200


def test_the_codec_is_openpis_byte_for_byte():
    obs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(4), "c": "text",
           "d": [1, 2.5, None]}
    assert packb(obs) == msgpack_numpy.packb(obs)
    back = unpackb(msgpack_numpy.packb(obs))
    np.testing.assert_array_equal(back["a"], obs["a"])
    assert back["b"] == 4 and back["c"] == "text"
    for bad in (np.array([object()]), np.zeros(2, dtype=np.complex64)):
        with pytest.raises(ValueError, match="refused"):
            packb({"x": bad})
    forged = msgpack_numpy.packb({"x": np.zeros(2)}).replace(b"<f8", b"|O8")
    with pytest.raises(ValueError, match="refused"):
        unpackb(forged)


@pytest.mark.parametrize("head", ["l1", "flow", "diffusion"])
def test_four_concurrent_clients_get_what_each_would_get_alone(served, head):
    bundle = _bundle(head)
    server = served(bundle, batch_window_ms=300, max_batch=8)
    observations = [{**_observation(i, TASKS[i]), "sampling/seed": 10 + i} for i in range(4)]
    alone = [bundle(o_without(o), Sampling(generator=(torch.Generator().manual_seed(10 + i),)))
             for i, o in enumerate(observations)]
    clients = [Client("127.0.0.1", server.port) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda c, o: c.infer(o), clients, observations))
    sizes = [r["server_timing"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes  # batched: they arrived within the window
    for got, want in zip(responses, alone):
        np.testing.assert_allclose(got["actions"], want, atol=1e-5)


def o_without(observation: dict) -> dict:
    return {k: v for k, v in observation.items() if not k.startswith("sampling/")}


def test_a_single_client_does_not_wait_for_the_batching_window(served):
    server = served(batch_window_ms=2000)
    client = Client("127.0.0.1", server.port)
    start = time.perf_counter()
    response = client.infer(_observation())
    assert response["server_timing"]["queue_ms"] < 500  # not the 2 s window
    assert time.perf_counter() - start < 2.0


def test_bad_observations_get_an_error_frame_naming_the_key_and_the_server_goes_on(served):
    server = served()
    client = Client("127.0.0.1", server.port)
    cases = {
        "missing": ({k: v for k, v in _observation().items() if k != "prompt"},
                    r"missing \['prompt'\]"),
        "shape": ({**_observation(), "observation/image": np.zeros((224, 224), np.uint8)},
                  r"'observation/image' has shape \[224, 224\], expected \[H, W, 3\]"),
        "dtype": ({**_observation(), "observation/image": np.zeros((8, 8, 3), np.int32)},
                  r"'observation/image' has dtype int32"),
        "state": ({**_observation(), "observation/state": np.zeros(4, np.float32)},
                  r"'observation/state' has shape \[4\], expected \[5\]"),
        "nan": ({**_observation(), "observation/state": np.full(5, np.nan, np.float32)},
                r"'observation/state' holds NaN"),
        "unknown": ({**_observation(), "observation/extra": 1}, r"unknown keys"),
        "seed": ({**_observation(), "sampling/seed": -1}, r"sampling/seed"),
    }
    for obs, message in cases.values():
        with pytest.raises(RuntimeError, match=message):
            client.infer(obs)
    assert client.infer(_observation())["actions"].shape == (4, 3)  # same connection


def test_a_model_crash_is_reported_to_that_client_and_others_are_served(served):
    bundle = _bundle()
    server = served(bundle, batch_window_ms=200)
    original = bundle.model.predict_action

    def fragile(batch, sampling=None, **kw):
        if batch.input_ids.shape[0] == 1 and fragile.fail_next:
            fragile.fail_next = False
            raise RuntimeError("a CUDA error, say")
        return original(batch, sampling, **kw)

    fragile.fail_next = True
    bundle.model.predict_action = fragile
    client = Client("127.0.0.1", server.port)
    with pytest.raises(RuntimeError, match="inference failed: RuntimeError: a CUDA error"):
        client.infer(_observation())
    assert client.infer(_observation())["actions"].shape == (4, 3)


def test_one_bad_request_in_a_batch_does_not_fail_the_others(served):
    bundle = _bundle()
    server = served(bundle, batch_window_ms=300)
    long_prompt = " ".join(["pick"] * 5000)  # past the decoder's positions: refused
    clients = [Client("127.0.0.1", server.port) for _ in range(3)]
    prompts = [TASKS[0], long_prompt, TASKS[1]]

    def ask(i):
        try:
            return clients[i].infer({**_observation(i), "prompt": prompts[i]})
        except RuntimeError as error:
            return error

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(ask, range(3)))
    assert isinstance(results[1], RuntimeError) and "inference failed" in str(results[1])
    assert results[0]["actions"].shape == (4, 3) and results[2]["actions"].shape == (4, 3)


def test_an_api_key_is_required_before_any_inference(served):
    server = served(api_key="s3cret")
    with pytest.raises(Exception, match="401"):
        Client("127.0.0.1", server.port)
    with pytest.raises(Exception, match="401"):
        Client("127.0.0.1", server.port, api_key="wrong")
    assert server.server.served == 0
    client = Client("127.0.0.1", server.port, api_key="s3cret")
    assert client.infer(_observation())["actions"].shape == (4, 3)


def test_a_disconnecting_or_slow_client_does_not_stall_the_others(served):
    server = served(max_message_bytes=2**20)
    from websockets.sync.client import connect

    gone = connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None)
    gone.recv()  # metadata
    gone.send(msgpack_numpy.packb(_observation()))
    gone.close()  # leaves before its answer
    idle = connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None)
    idle.recv()  # connected, never sends: a slow robot
    big = connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None)
    big.recv()
    big.send(b"\x00" * (2 * 2**20))  # over the message size limit: that connection closes
    client = Client("127.0.0.1", server.port)
    start = time.perf_counter()
    assert client.infer(_observation())["actions"].shape == (4, 3)
    assert time.perf_counter() - start < 30
    idle.close()


def test_real_time_chunking_over_the_wire_equals_the_wrapper_in_process(served):
    bundle = _bundle()
    server = served(bundle)
    client = Client("127.0.0.1", server.port)
    # 2 unexecuted actions, inside the normaliser's bounds (it clips outside them)
    prev = np.array([[-0.5, 0.2, 0.3], [0.1, 0.6, -1.0]], dtype=np.float32)
    for mode, wrapper in (("guided", GuidedRTC(torch.from_numpy(prev)[None], 1, 2,
                                               normalizer=bundle.model.action_normalizer)),
                          ("inpaint", InpaintRTC(torch.from_numpy(prev)[None], frozen=1,
                                                 normalizer=bundle.model.action_normalizer))):
        got = client.infer({**_observation(), "sampling/seed": 5, "rtc/prev_chunk": prev,
                            "rtc/inference_delay": 1, "rtc/mode": mode})["actions"]
        want = bundle(_observation(), Sampling(generator=(torch.Generator().manual_seed(5),),
                                               step_wrapper=wrapper))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=mode)
    # inpainting (the last mode) freezes the first d actions to the previous chunk's
    np.testing.assert_allclose(got[:1], prev[:1], atol=1e-5)
    with pytest.raises(RuntimeError, match="rtc/inference_delay"):
        client.infer({**_observation(), "rtc/prev_chunk": prev})
    l1 = served(_bundle("l1"))
    with pytest.raises(RuntimeError, match="needs an iterative head"):
        Client("127.0.0.1", l1.port).infer({**_observation(), "rtc/prev_chunk": prev,
                                              "rtc/inference_delay": 1})


def test_the_executor_splices_chunks_and_measures_the_delay():
    """A scripted policy whose answers take 2.5 control periods: each new chunk arrives 3
    steps after its request; its first 3 actions are dropped, the rest follows."""

    class Scripted:
        def __init__(self) -> None:
            self.calls, self.seen = 0, []

        def infer(self, obs):
            self.seen.append({k: v for k, v in obs.items() if k.startswith("rtc/")})
            self.calls += 1
            if self.calls > 1:
                time.sleep(0.025)
            base = 100.0 * self.calls
            return {"actions": (base + np.arange(8, dtype=np.float32))[:, None]}

    policy = Scripted()
    sent = []
    executor = ChunkExecutor(policy, observe=lambda: {"prompt": "x"}, act=sent.append,
                             control_hz=100, execution_horizon=4)
    executed = [float(a[0]) for a in executor.run(14)]
    assert executed[:4] == [100, 101, 102, 103]
    assert executor.delays and all(d >= 2 for d in executor.delays), executor.delays
    d = executor.delays[0]
    assert executed[4:4 + d] == [104 + k for k in range(d)]  # the old chunk meanwhile
    assert executed[4 + d] == 200 + d  # the new chunk, its first d actions dropped
    assert policy.seen[1]["rtc/prefix_attention_horizon"] == 4  # H - s unexecuted actions
    assert policy.seen[1]["rtc/inference_delay"] == 0  # nothing measured yet
    assert policy.seen[2]["rtc/inference_delay"] == d  # the measured delay goes out
    assert len(sent) == 14 and executor.starved == 0
    executor.close()


def test_the_executor_drives_the_server_over_the_wire(served):
    server = served()
    policy = WebsocketPolicy("127.0.0.1", server.port)
    executor = ChunkExecutor(policy, observe=_observation, act=lambda a: None,
                             control_hz=20, execution_horizon=2)
    executed = executor.run(10)
    assert len(executed) == 10 and all(a.shape == (3,) for a in executed)
    assert len(executor.requests) >= 2 and "rtc/inference_delay" in executor.requests[1]
    executor.close()
    policy.close()


def test_the_command_line_serves_a_saved_bundle(tmp_path):
    path = _bundle().save(tmp_path / "policy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLAKIT_API_KEY": "k", "VLAKIT_TYPECHECK": "0"}
    process = subprocess.Popen([sys.executable, "-m", "vlakit.serve", str(path), "--host",
                                "127.0.0.1", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                client = Client("127.0.0.1", port, api_key="k")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.5)
        assert client.infer(_observation())["actions"].shape == (4, 3)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "warm-up prediction" in output and "batch 1" in output, output[-2000:]


def test_the_console_script_has_the_serve_command(capsys):
    from vlakit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in ("--port", "--batch-window-ms", "--api-key-env", "--compile", "--dtype"):
        assert option in out
