"""The robot side: execute a chunk while the next one is inferred, and splice them.

```
control steps:  0   1   2 ... s-1 | s  ... s+d-1 | s+d ...
executing:      chunk A[0 .. s-1] | A[s .. s+d-1] | B[d ..]      (B arrived after d steps)
inference:                        └─ request B (obs at step s, rtc/prev_chunk = A[s:],
                                      rtc/inference_delay = d estimated) ─┘
```

[ChunkExecutor][vlakit.serve.ChunkExecutor] runs a control loop at a fixed rate. After
``s`` (the execution horizon) actions of the current chunk it sends the next request in a
background thread, with the current chunk's unexecuted actions (``rtc/prev_chunk``) and its
estimate of the delay ``d`` in control steps (``rtc/inference_delay``, the largest delay
measured over the last requests, rounded up), and keeps executing the current chunk. When
the response arrives ``d'`` steps later, the new chunk's first ``d'`` actions are dropped
(those steps already ran, from the old chunk: with real-time chunking the new chunk's
first ``d`` actions were sampled to agree with them) and execution continues from the new
chunk's action ``d'``. If the old chunk runs out first, the last action is held and the
step counted as starved.
"""

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from vlakit.serve.codec import packb, unpackb

__all__ = ["ChunkExecutor", "WebsocketPolicy"]


class WebsocketPolicy:
    """A client of openpi's wire (what ``openpi_client.WebsocketClientPolicy`` does, without
    its numpy < 2 pin): ``infer(observation) -> response``; ``metadata`` is the server's
    first frame. An error frame raises ``RuntimeError`` with the server's message.

    Args:
        host: ``"localhost"`` or a ``ws://`` URI.
        port: the server's port.
        api_key: sent as ``Authorization: Api-Key <key>``.
    """

    def __init__(self, host: str = "localhost", port: int | None = 8000,
                 api_key: str | None = None) -> None:
        from websockets.sync.client import connect

        uri = host if host.startswith("ws") else f"ws://{host}"
        if port is not None:
            uri += f":{port}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._ws = connect(uri, compression=None, max_size=None, additional_headers=headers)
        self.metadata = unpackb(self._ws.recv())
        self._lock = threading.Lock()

    def infer(self, observation: Mapping[str, Any]) -> dict:
        with self._lock:
            self._ws.send(packb(dict(observation)))
            response = self._ws.recv()
        if isinstance(response, str):
            raise RuntimeError(f"the policy server answered: {response}")
        return unpackb(response)

    def close(self) -> None:
        self._ws.close()


class ChunkExecutor:
    """Run a robot's control loop against a policy server with real-time chunking.

    Args:
        policy: anything with ``infer(observation) -> {"actions": [H, a], ...}``:
            [WebsocketPolicy][vlakit.serve.WebsocketPolicy] or openpi-client's
            ``WebsocketClientPolicy``.
        observe: returns the robot's current observation (the policy's keys).
        act: sends one action ``[a]`` to the robot.
        control_hz: the control rate (actions per second).
        execution_horizon: ``s``, actions executed from a chunk before the next request;
            the previous chunk's leftover is then ``H - s`` long, and a delay of up to
            ``H - s`` steps is covered.
        rtc: send ``rtc/prev_chunk`` and ``rtc/inference_delay`` (the server then samples
            the next chunk consistent with the actions still executing); ``False``: plain
            asynchronous switching.
        rtc_mode: ``"guided"`` or ``"inpaint"`` (``None``: the server's default for the head).
        delay_window: delays (in steps) of this many recent requests give the estimate.
        clock: ``time.perf_counter``-like (tests may pass a fake one with ``sleep``).
        sleep: ``time.sleep``-like.
    """

    def __init__(
        self,
        policy: Any,
        observe: Callable[[], Mapping[str, Any]],
        act: Callable[[np.ndarray], None],
        *,
        control_hz: float | int,
        execution_horizon: int,
        rtc: bool = True,
        rtc_mode: str | None = None,
        delay_window: int = 5,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if control_hz <= 0:
            raise ValueError(f"control_hz must be > 0, got {control_hz}")
        if execution_horizon < 1:
            raise ValueError(f"execution_horizon s must be >= 1, got {execution_horizon}")
        self.policy, self.observe, self.act = policy, observe, act
        self.period = 1.0 / control_hz
        self.s = execution_horizon
        self.rtc, self.rtc_mode = rtc, rtc_mode
        self.delay_window = delay_window
        self.clock, self.sleep = clock, sleep
        self.delays: list[int] = []
        """The measured delay of every request after the first, in control steps."""
        self.starved = 0
        """Control steps that found no action left (the last one was held)."""
        self.executed: list[np.ndarray] = []
        """Every action sent to the robot, in order."""
        self.requests: list[dict] = []
        """The RTC fields of every request sent (for inspection)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlakit-request")

    def estimated_delay(self) -> int:
        """``d`` for the next request: the largest recent measured delay (0 before any)."""
        recent = self.delays[-self.delay_window:]
        return max(recent) if recent else 0

    def _request(self, leftover: np.ndarray | None) -> Future:
        observation = dict(self.observe())
        fields: dict[str, Any] = {}
        if self.rtc and leftover is not None and len(leftover):
            fields = {"rtc/prev_chunk": np.ascontiguousarray(leftover, dtype=np.float32),
                      "rtc/inference_delay": min(self.estimated_delay(), len(leftover)),
                      "rtc/prefix_attention_horizon": len(leftover)}
            if self.rtc_mode is not None:
                fields["rtc/mode"] = self.rtc_mode
        self.requests.append({k: v for k, v in fields.items() if k != "rtc/prev_chunk"})
        return self._pool.submit(self.policy.infer, {**observation, **fields})

    def run(self, steps: int) -> list[np.ndarray]:
        """Run ``steps`` control steps; returns the actions executed."""
        first = self._request(None).result()  # the first chunk: nothing to overlap with
        chunk = np.asarray(first["actions"], dtype=np.float32)
        horizon = chunk.shape[0]
        if not self.s <= horizon:
            raise ValueError(f"execution_horizon s={self.s} exceeds the chunk length "
                             f"H={horizon}")
        index, pending, sent_at = 0, None, 0
        next_tick = self.clock()
        for step in range(steps):
            if pending is not None and pending.done():
                response = pending.result()
                delay = step - sent_at  # steps executed from the old chunk meanwhile
                self.delays.append(delay)
                new = np.asarray(response["actions"], dtype=np.float32)
                chunk, index, pending = new, min(delay, len(new)), None
            if pending is None and index >= self.s:
                pending, sent_at = self._request(chunk[index:]), step
            if index < len(chunk):
                action = chunk[index]
                index += 1
            else:
                action = self.executed[-1] if self.executed else chunk[-1]
                self.starved += 1
            self.act(action)
            self.executed.append(action)
            next_tick += self.period
            wait = next_tick - self.clock()
            if wait > 0:
                self.sleep(wait)
        if pending is not None:
            pending.cancel()
        return self.executed

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

