"""A policy server that speaks openpi's websocket protocol, batching concurrent robots.

```
robot ─ client ─ ws ─┐ decode, check        ┌ preprocess ─ predict_action ─ split ─┐
robot ─ client ─ ws ─┼────────────── queue ─┤ one batch of what arrived in the     ├─ a frame
robot ─ client ─ ws ─┘                      └ window (one worker thread)           ┘  each
```

The wire is openpi's (``openpi_client.websocket_client_policy.WebsocketClientPolicy``
connects unmodified): msgpack frames with numpy arrays
([vlakit.serve.codec][vlakit.serve.codec]); the server's first frame is a metadata map;
then each observation map gets back a map with ``actions`` ``[chunk, action_dim]`` float32
(unnormalised, the robot's units), ``server_timing`` and ``policy_timing``; an error is a
text frame (the client raises it) and the connection stays open. ``GET /healthz`` answers
200 over plain HTTP.

Observation keys are the bundle's ([ObservationKeys][vlakit.bundle.ObservationKeys]), plus
optional request fields:

- ``sampling/seed`` (int): the seed of this request's generator; with it the actions are
  the same whether the request was batched with others or not (each row draws from its own
  generator). Without it a fresh random seed is drawn (reported back as ``sampling/seed``).
- ``rtc/prev_chunk`` ``[k, a]``: the previous chunk's unexecuted actions (robot units),
  with ``rtc/inference_delay`` (``d``, control steps), optionally
  ``rtc/prefix_attention_horizon`` (``H - s``, default ``k``),
  ``rtc/prefix_attention_schedule`` (default ``"exp"``), ``rtc/max_guidance_weight``
  (default 10), ``rtc/mode`` (``"guided"``, flow heads' default, or ``"inpaint"``,
  diffusion heads' default) and ``rtc/ramp_rate`` (inpainting, default 5): real-time
  chunking ([GuidedRTC][vlakit.heads.GuidedRTC], [InpaintRTC][vlakit.heads.InpaintRTC]);
  these key names are the ones openpi's forks use.

Requests that arrive within the batching window (from any connections) run as one
``predict_action`` call per group of equal real-time-chunking settings; a batch that fails
is retried request by request, so one bad request gets its own error and the others their
actions.
"""

import asyncio
import dataclasses
import hmac
import http
import logging
import secrets
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from vlakit.bundle import PolicyBundle
from vlakit.heads import (
    DiffusionActionHead,
    FlowMatchingHead,
    GuidedRTC,
    InpaintRTC,
    Pi0Head,
    Pi05Head,
    Sampling,
)
from vlakit.serve.codec import CodecError, packb, unpackb

__all__ = ["PolicyServer", "ObservationError", "API_KEY_ENV"]

API_KEY_ENV = "VLAKIT_API_KEY"
"""The environment variable the command line reads the API key from (never an argument)."""

_LOG = logging.getLogger("vlakit.serve")
_ITERATIVE = (FlowMatchingHead, DiffusionActionHead, Pi0Head, Pi05Head)
_FLOW = (FlowMatchingHead, Pi0Head, Pi05Head)
_RTC_KEYS = ("rtc/prev_chunk", "rtc/inference_delay", "rtc/prefix_attention_horizon",
             "rtc/prefix_attention_schedule", "rtc/max_guidance_weight", "rtc/mode",
             "rtc/ramp_rate")
_REQUEST_KEYS = ("sampling/seed", *_RTC_KEYS)


class ObservationError(ValueError):
    """An observation the policy cannot read: the message names the key and what it
    expects. Sent back to that client as an error frame."""


@dataclasses.dataclass
class _Request:
    observation: dict
    seed: int
    rtc: dict | None
    received: float
    decode_ms: float
    future: asyncio.Future = None  # type: ignore[assignment]
    batched: float = 0.0

    def group(self) -> tuple:
        """Requests of one group run as one batch: the same RTC settings."""
        if self.rtc is None:
            return ()
        rtc = self.rtc
        return (rtc["mode"], rtc["delay"], rtc["horizon"], rtc["schedule"], rtc["weight"],
                rtc["ramp"], rtc["prev"].shape)


class _StageTimer:
    """A step wrapper that notes when the first denoising step starts (the prefix is done
    by then) and delegates to ``inner`` (a real-time-chunking wrapper) or the plain step."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self.inner, self.device, self.first = inner, device, None

    def __call__(self, step):
        if self.first is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first = time.perf_counter()
        return step.run(step.x) if self.inner is None else self.inner(step)


class PolicyServer:
    """Serve a [PolicyBundle][vlakit.bundle.PolicyBundle] to robots over openpi's wire.

    Args:
        bundle: the policy (its model on the device it runs on).
        host: the interface to listen on.
        port: the TCP port (openpi's default 8000; 0 picks a free one, see ``port`` after
            [start][vlakit.serve.PolicyServer.start]).
        batch_window_ms: how long the first request of a batch waits for others (0: batch
            only what is already queued); never longer than it takes every open connection
            to have a request in the batch (a single robot never waits).
        max_batch: the most requests one forward takes.
        api_key: when set, a connection must send ``Authorization: Api-Key <key>``
            (openpi-client's header) or is refused with 401 before any inference.
        max_message_bytes: larger frames are refused (the connection is closed with 1009).
        stage_timing: time the prefix and the denoising steps apart (one device
            synchronisation at the first step on a GPU).
    """

    def __init__(
        self,
        bundle: PolicyBundle,
        *,
        host: str = "0.0.0.0",
        port: int = 8000,
        batch_window_ms: float | int = 2.0,
        max_batch: int = 16,
        api_key: str | None = None,
        max_message_bytes: int = 32 * 2**20,
        stage_timing: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {batch_window_ms}")
        self.bundle = bundle
        self.host, self.port = host, port
        self.batch_window = batch_window_ms / 1000.0
        self.max_batch = max_batch
        self.api_key = api_key or None
        self.max_message_bytes = max_message_bytes
        self.stage_timing = stage_timing
        description = bundle.describe()
        self.state_dim = description["proprio_dim"]
        self.chunk_size = description["action"]["chunk_size"]
        self.action_dim = description["action"]["action_dim"]
        self.metadata = self._metadata(description)
        self._device = next(bundle.model.parameters()).device
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlakit-infer")
        self._queue: asyncio.Queue | None = None
        self._server = None
        self._batcher: asyncio.Task | None = None
        self._connections = 0
        self.served = 0
        """Requests answered with actions so far."""

    # -- metadata and checks ---------------------------------------------------------------

    def _metadata(self, description: dict) -> dict:
        head = self.bundle.model.head
        rtc = (["guided", "inpaint"] if isinstance(head, _FLOW) else
               ["inpaint"] if isinstance(head, _ITERATIVE) else [])
        return {
            "server": "vlakit",
            "protocol": "openpi websocket + msgpack-numpy",
            "observation_keys": description["observation"],
            "image_size": description["image_size"],
            "num_views": description["num_views"],
            "state_dim": self.state_dim,
            "action_shape": [self.chunk_size, self.action_dim],
            "chunk_size": self.chunk_size,
            "action_dim": self.action_dim,
            "head": type(head).__name__,
            "rtc_modes": rtc,
            "request_keys": list(_REQUEST_KEYS),
            "batching": {"window_ms": self.batch_window * 1000, "max_batch": self.max_batch},
            "control": (
                f"each response is one chunk of {self.chunk_size} actions of "
                f"{self.action_dim} dims in the robot's units (unnormalised); execute them "
                f"at the control rate the policy was trained at. Chunk rate = action rate / "
                f"actions executed per chunk; send rtc/prev_chunk and rtc/inference_delay "
                f"to overlap inference with execution"
            ),
        }

    def check_observation(self, obs: Any) -> tuple[dict, int, dict | None]:
        """Split a received map into the bundle's observation, this request's seed and its
        real-time-chunking settings, checking every field; an
        [ObservationError][vlakit.serve.ObservationError] names the key and what it
        expects."""
        if not isinstance(obs, Mapping):
            raise ObservationError(f"an observation is a map of keys to values, got a "
                                   f"{type(obs).__name__}")
        keys = self.bundle.keys
        wanted = keys.all
        missing = [k for k in wanted if k not in obs]
        unknown = sorted(str(k) for k in obs if k not in wanted and k not in _REQUEST_KEYS)
        if missing or unknown:
            raise ObservationError(
                (f"missing {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown keys {unknown}" if unknown else "")
                + f": the policy reads {list(wanted)} (and optionally {list(_REQUEST_KEYS)})"
            )
        height, width = self.bundle.model.encoder.image_size
        for key in keys.images:
            self._check_image(key, obs[key], height, width)
        if keys.state is not None:
            self._check_state(keys.state, obs[keys.state])
        if not isinstance(obs[keys.prompt], str):
            raise ObservationError(f"{keys.prompt!r} must be a string (the instruction), got "
                                   f"{type(obs[keys.prompt]).__name__}")
        observation = {k: obs[k] for k in wanted}
        seed = obs.get("sampling/seed")
        if seed is None:
            seed = secrets.randbits(63)
        elif isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer)) or \
                not 0 <= int(seed) < 2**63:
            raise ObservationError(f"'sampling/seed' must be an integer in [0, 2**63), got "
                                   f"{seed!r}")
        return observation, int(seed), self._check_rtc(obs)

    @staticmethod
    def _check_image(key: str, image: Any, height: int, width: int) -> None:
        if image is None:
            return  # an absent camera: masked out
        expected = f"[H, W, 3] uint8 (openpi's HWC; the model reads {height}x{width})"
        if not isinstance(image, np.ndarray):
            raise ObservationError(f"{key!r} must be an image array {expected}, got a "
                                   f"{type(image).__name__}")
        if image.ndim != 3 or 3 not in (image.shape[-1], image.shape[0]):
            raise ObservationError(f"{key!r} has shape {list(image.shape)}, expected "
                                   f"{expected}")
        if image.dtype == np.uint8:
            return
        if image.dtype.kind != "f":
            raise ObservationError(f"{key!r} has dtype {image.dtype}, expected {expected} "
                                   f"or float in [0, 1]")
        if not np.isfinite(image).all():
            raise ObservationError(f"{key!r} holds NaN or infinite values")

    def _check_state(self, key: str, state: Any) -> None:
        check_state(key, state, self.state_dim)

    def _check_rtc(self, obs: Mapping) -> dict | None:
        given = [k for k in _RTC_KEYS if k in obs]
        if not given:
            return None
        prev = obs.get("rtc/prev_chunk")
        if prev is None:
            raise ObservationError(f"{given} set without 'rtc/prev_chunk' (the previous "
                                   f"chunk's unexecuted actions [k, {self.action_dim}])")
        head = self.bundle.model.head
        if not isinstance(head, _ITERATIVE):
            raise ObservationError(f"real-time chunking needs an iterative head (flow or "
                                   f"diffusion); this policy's is {type(head).__name__}")
        if not isinstance(prev, np.ndarray) or prev.ndim != 2 or prev.shape[1] != \
                self.action_dim or not 1 <= prev.shape[0] <= self.chunk_size:
            shape = list(prev.shape) if isinstance(prev, np.ndarray) else type(prev).__name__
            raise ObservationError(f"'rtc/prev_chunk' has shape {shape}, expected [k, "
                                   f"{self.action_dim}] with 1 <= k <= {self.chunk_size}")
        if prev.dtype.kind != "f" or not np.isfinite(prev).all():
            raise ObservationError("'rtc/prev_chunk' must be finite floats")
        delay = obs.get("rtc/inference_delay")
        if isinstance(delay, bool) or not isinstance(delay, (int, np.integer)):
            raise ObservationError(f"'rtc/inference_delay' (d, control steps) must be an "
                                   f"integer, got {delay!r}")
        horizon = obs.get("rtc/prefix_attention_horizon", prev.shape[0])
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)):
            raise ObservationError(f"'rtc/prefix_attention_horizon' (H - s) must be an "
                                   f"integer, got {horizon!r}")
        mode = obs.get("rtc/mode", "guided" if isinstance(head, _FLOW) else "inpaint")
        if mode not in self.metadata["rtc_modes"]:
            raise ObservationError(f"'rtc/mode' {mode!r} is not one of this policy's "
                                   f"{self.metadata['rtc_modes']}")
        return {"prev": np.array(prev, dtype=np.float32), "delay": int(delay),
                "horizon": int(horizon), "mode": mode,
                "schedule": str(obs.get("rtc/prefix_attention_schedule", "exp")),
                "weight": float(obs.get("rtc/max_guidance_weight", 10.0)),
                "ramp": float(obs.get("rtc/ramp_rate", 5.0))}

    # -- inference (the worker thread) ---------------------------------------------------------

    def _run_group(self, requests: list[_Request]) -> list[dict]:
        model, head = self.bundle.model, self.bundle.model.head
        sync = torch.cuda.synchronize if self._device.type == "cuda" else (lambda *a: None)
        start = time.perf_counter()
        batch = self.bundle.inputs([r.observation for r in requests])
        preprocessed = time.perf_counter()
        generators = tuple(torch.Generator(self._device).manual_seed(r.seed) for r in requests)
        inner = None if requests[0].rtc is None else self._wrapper_for(requests)
        timer = (_StageTimer(inner, self._device) if isinstance(head, _ITERATIVE)
                 and (self.stage_timing or inner is not None) else None)
        sampling = Sampling(generator=generators, step_wrapper=timer)
        actions = model.predict_action(batch, sampling)
        sync(self._device)
        predicted = time.perf_counter()
        chunks = actions.float().cpu().numpy()
        done = time.perf_counter()
        model_ms = (predicted - preprocessed) * 1000
        steps_ms = 0.0 if timer is None or timer.first is None else \
            (predicted - timer.first) * 1000
        shared = {"batch_size": len(requests), "preprocess_ms": (preprocessed - start) * 1000,
                  "model_ms": model_ms, "prefix_ms": model_ms - steps_ms,
                  "steps_ms": steps_ms, "postprocess_ms": (done - predicted) * 1000}
        return [{"actions": np.ascontiguousarray(chunks[i], dtype=np.float32),
                 "timing": dict(shared), "seed": r.seed} for i, r in enumerate(requests)]

    def _wrapper_for(self, requests: list[_Request]):
        rtc = requests[0].rtc
        prev = torch.from_numpy(np.stack([r.rtc["prev"] for r in requests]))
        normalizer = self.bundle.model.action_normalizer
        if rtc["mode"] == "inpaint":
            return InpaintRTC(prev, frozen=rtc["delay"], ramp_rate=rtc["ramp"],
                              normalizer=normalizer)
        return GuidedRTC(prev, rtc["delay"], self.chunk_size - rtc["horizon"],
                         schedule=rtc["schedule"], max_guidance_weight=rtc["weight"],
                         normalizer=normalizer)

    def _infer(self, requests: list[_Request]) -> list[dict | Exception]:
        """Every request's result (or its exception), groups of equal RTC settings run as
        one batch each; a failed batch is retried request by request."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.group(), []).append(i)
        results: list[dict | Exception] = [None] * len(requests)  # type: ignore[list-item]
        for members in groups.values():
            chunk = [requests[i] for i in members]
            try:
                for i, out in zip(members, self._run_group(chunk)):
                    results[i] = out
            except Exception as error:  # noqa: BLE001 - reported to the client(s)
                if len(chunk) == 1:
                    _LOG.error("inference failed: %s", traceback.format_exc())
                    results[members[0]] = error
                    continue
                for i in members:  # isolate the request that fails
                    results[i] = self._infer([requests[i]])[0]
        return results

    # -- the event loop ------------------------------------------------------------------------

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = loop.time() + self.batch_window
            # wait only while another connection could still send (one robot: no wait)
            while len(batch) < min(self.max_batch, self._connections):
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        batch.append(self._queue.get_nowait())
                    else:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            now = time.perf_counter()
            for r in batch:
                r.batched = now
            results = await loop.run_in_executor(self._worker, self._infer, batch)
            for r, result in zip(batch, results):
                if r.future.done():
                    continue
                if isinstance(result, Exception):
                    r.future.set_exception(result)
                else:
                    r.future.set_result(result)
            total = sum(not isinstance(x, Exception) for x in results)
            self.served += total
            ok = [x for x in results if not isinstance(x, Exception)]
            if ok:
                t = ok[0]["timing"]
                _LOG.info("batch %d (%d failed): preprocess %.1f ms, model %.1f ms (prefix "
                          "%.1f, steps %.1f), postprocess %.1f ms", len(batch),
                          len(batch) - total, t["preprocess_ms"], t["model_ms"],
                          t["prefix_ms"], t["steps_ms"], t["postprocess_ms"])

    def _process_request(self, connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            header = request.headers.get("Authorization", "")
            expected = f"Api-Key {self.api_key}"
            if not hmac.compare_digest(header.encode(), expected.encode()):
                _LOG.warning("refused a connection from %s: no or a wrong API key",
                             connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "a valid 'Authorization: Api-Key <key>' header is "
                                          "required\n")
        return None

    async def _handle(self, connection) -> None:
        from websockets.exceptions import ConnectionClosed

        self._connections += 1
        try:
            await connection.send(packb(self.metadata))
            previous_total = previous_encode = 0.0
            async for message in connection:
                received = time.perf_counter()
                if isinstance(message, str):
                    await connection.send("error: send observations as msgpack binary "
                                          "frames (openpi's msgpack-numpy), not text")
                    continue
                try:
                    decoded = unpackb(message)
                    observation, seed, rtc = self.check_observation(decoded)
                except (CodecError, ObservationError) as error:
                    await connection.send(f"error: {error}")
                    continue
                request = _Request(observation, seed, rtc, received,
                                   (time.perf_counter() - received) * 1000)
                request.future = asyncio.get_running_loop().create_future()
                await self._queue.put(request)
                try:
                    result = await request.future
                except Exception as error:  # noqa: BLE001 - the model's failure, reported
                    await connection.send(f"error: inference failed: {type(error).__name__}: "
                                          f"{error}")
                    continue
                timing = result["timing"]
                queue_ms = (request.batched - received) * 1000 - request.decode_ms
                infer_ms = (time.perf_counter() - request.batched) * 1000
                response = {
                    "actions": result["actions"],
                    "sampling/seed": result["seed"],
                    "policy_timing": {"infer_ms": timing["model_ms"],
                                      "prefix_ms": timing["prefix_ms"],
                                      "steps_ms": timing["steps_ms"]},
                    "server_timing": {"infer_ms": infer_ms, "decode_ms": request.decode_ms,
                                      "queue_ms": queue_ms, **timing,
                                      "prev_encode_ms": previous_encode,
                                      "prev_total_ms": previous_total},
                }
                encode_start = time.perf_counter()
                frame = packb(response)
                previous_encode = (time.perf_counter() - encode_start) * 1000
                await connection.send(frame)
                previous_total = (time.perf_counter() - received) * 1000
        except ConnectionClosed:
            pass  # the client left; its pending result (if any) is dropped
        finally:
            self._connections -= 1

    async def start(self) -> "PolicyServer":
        """Start listening (inside a running event loop); ``port`` is then the bound one."""
        from websockets.asyncio.server import serve

        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._batches())
        self._server = await serve(self._handle, self.host, self.port, compression=None,
                                   max_size=self.max_message_bytes,
                                   process_request=self._process_request)
        self.port = self._server.sockets[0].getsockname()[1]
        _LOG.info("serving %s on ws://%s:%d (batch window %.1f ms, max batch %d%s)",
                  type(self.bundle.model.head).__name__, self.host, self.port,
                  self.batch_window * 1000, self.max_batch,
                  ", API key required" if self.api_key else "")
        return self

    async def stop(self) -> None:
        """Close every connection and stop."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._batcher is not None:
            self._batcher.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def serve_forever(self) -> None:
        """Start, then serve until cancelled."""
        await self.start()
        try:
            await self._server.serve_forever()
        finally:
            await self.stop()

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C), in a new event loop."""
        try:
            asyncio.run(self.serve_forever())
        except KeyboardInterrupt:
            pass


def check_state(key: str, state: Any, state_dim: int | None) -> None:
    """Raise an [ObservationError][vlakit.serve.ObservationError] naming ``key`` unless
    ``state`` is a finite numeric array ``[state_dim]`` (any 1-d length when ``state_dim``
    is ``None``): the robot state a request carries (this server and the vla-eval
    adapter)."""
    expected = f"[{state_dim}] float" if state_dim else "a 1-d float array"
    if not isinstance(state, np.ndarray) or state.dtype.kind not in "fiu":
        raise ObservationError(f"{key!r} must be {expected}, got "
                               f"{getattr(state, 'dtype', type(state).__name__)}")
    if state.ndim != 1 or (state_dim and state.shape[0] != state_dim):
        raise ObservationError(f"{key!r} has shape {list(state.shape)}, expected "
                               f"{expected}")
    if not np.isfinite(state).all():
        raise ObservationError(f"{key!r} holds NaN or infinite values: {state.tolist()}")


def warm_up(bundle: PolicyBundle) -> float:
    """One prediction on a black observation (compiles a compiled model), in ms."""
    keys = bundle.keys
    height, width = bundle.model.encoder.image_size
    obs: dict[str, Any] = {k: np.zeros((height, width, 3), np.uint8) for k in keys.images}
    if keys.state is not None:
        obs[keys.state] = np.zeros(bundle.describe()["proprio_dim"] or 0, np.float32)
    obs[keys.prompt] = "warm up"
    start = time.perf_counter()
    bundle(obs, Sampling(generator=torch.Generator(next(bundle.model.parameters()).device)))
    return (time.perf_counter() - start) * 1000

