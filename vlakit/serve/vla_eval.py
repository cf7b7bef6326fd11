"""A policy bundle as a model server of the allenai vla-evaluation harness (``vla-eval``
0.8.0), so any bundle runs in its benchmarks (LIBERO, CALVIN, SimplerEnv, ..., and the
Meta-World class in ``benchmarks/metaworld/``).

```
vla-eval run ─ ws (vla-eval's msgpack) ─ VlaEvalServer ─ PolicyBundle
  {"images": {cam: [H, W, 3] uint8},     cameras -> bundle.keys.images
   "state" | "states": [s] float,        -> bundle.keys.state
   "task_description": str}              -> bundle.keys.prompt
                          <- {"actions": [a]}: one action of the chunk per observation
```

Start it with ``python -m vlakit.serve.vla_eval BUNDLE_DIR --port 8000`` (or
[serve_vla_eval][vlakit.serve.vla_eval.serve_vla_eval]), then run a benchmark config
against it with ``vla-eval run --no-docker -c CONFIG.yaml``; or in one process with
``vla_eval.api.evaluate(VlaEvalServer(bundle), config, docker=False)``.

The server predicts a chunk ``[chunk, a]`` (unnormalised, the bundle's units) and vla-eval
executes it action by action, calling the policy again when ``replan`` actions (default:
the whole chunk) have run. A sampling head draws from a generator seeded by the episode
(task name and episode index) and the step, so the same run gives the same numbers.

Importing this module needs ``vla-eval`` (``pip install vla-eval==0.8.0``);
``vlakit.serve`` does not import it.
"""

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vla_eval.model_servers.base import SessionContext
from vla_eval.model_servers.predict import PredictModelServer
from vla_eval.specs import (
    GRIPPER_CLOSE_POS,
    IMAGE_RGB,
    LANGUAGE,
    POSITION_DELTA,
    ROTATION_AA,
    DimSpec,
)

from vlakit.bundle import PolicyBundle
from vlakit.heads import Sampling
from vlakit.serve.server import ObservationError, check_state
from vlakit.serve.server import warm_up as _warm_up

__all__ = ["VlaEvalServer", "serve_vla_eval", "ACTION_SPECS", "main"]

_LOG = logging.getLogger("vlakit.serve.vla_eval")

ACTION_SPECS: dict[str, dict[str, DimSpec] | None] = {
    "raw": None,  # {"actions": DimSpec("actions", action_dim, "raw")}
    "libero": {"position": POSITION_DELTA, "rotation": ROTATION_AA,
               "gripper": GRIPPER_CLOSE_POS},
}
"""Named action specs for ``action_spec`` (``--action-spec``): ``raw`` (one component
``actions`` of the bundle's width; what the Meta-World benchmark declares) and ``libero``
(vla-eval's LIBERO layout: delta xyz, axis-angle, gripper +1 = close; 7 dims)."""

STATE_KEYS = ("state", "states")
"""Where vla-eval benchmarks put the state: ``state`` (the convention) or ``states`` (most of
vla-eval's own: LIBERO, CALVIN, SimplerEnv, RoboCasa, ...)."""

_KNOWN_KEYS = frozenset({"images", "task_description", *STATE_KEYS,
                         "controller_states", "episode_restart"})


def _stable_seed(*parts: Any) -> int:
    """A seed in ``[0, 2**63)`` from ``parts`` (the same in every process and run)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class VlaEvalServer(PredictModelServer):
    """Serve a [PolicyBundle][vlakit.bundle.PolicyBundle] to vla-eval's benchmarks.

    Args:
        bundle: the policy, or a bundle directory (loaded with
            [PolicyBundle.load][vlakit.bundle.PolicyBundle.load]).
        device: where a bundle directory is loaded (default: cuda if available, else cpu).
        dtype: the parameter dtype a bundle directory is loaded in (default: as saved).
        trust: modules of your own a bundle directory's model names.
        cameras: which of vla-eval's images feed the bundle's cameras: a mapping
            ``{vla-eval name: bundle image key}`` that names every bundle camera once
            (vla-eval images it does not name are not read, e.g. LIBERO's ``wrist`` for a
            one-camera policy), or a sequence of vla-eval names in the bundle's camera order.
            ``None``: the observation's images in the order they arrive, onto the bundle's
            cameras in order (their counts must be equal); the observation spec then names
            the bundle's keys, so vla-eval's spec check warns unless they are the benchmark's
            names.
        state_key: the observation key holding the state. ``None``: ``state`` or
            ``states`` (LIBERO's, CALVIN's, ...), whichever is there. A policy that reads no
            state reads none of them.
        seed: the base of every episode's sampling seed (see
            [seed_for][vlakit.serve.vla_eval.VlaEvalServer.seed_for]).
        replan: how many of each chunk's actions run before the policy is called again
            (vla-eval's ``chunk_size``; default the bundle's whole chunk).
        action_spec: what the actions are, for vla-eval's spec check: a name of
            [ACTION_SPECS][vlakit.serve.vla_eval.ACTION_SPECS] or ``{component: DimSpec}``
            whose dims add up to the bundle's action width.
        state_format: the state's convention for the spec check (e.g. LIBERO's
            ``eef_pos3_axisangle3_gripper2``); ``raw`` names none.
        observation_params: sent to the benchmark in vla-eval's HELLO and merged into its
            constructor's arguments where it takes them (the config wins), e.g.
            ``{"send_state": True}`` for LIBERO.
        max_batch_size: observations of concurrent sessions (sharded runs) predicted in one
            bundle call (vla-eval's batching).
        max_wait_time: seconds a batch waits to fill (with ``max_batch_size > 1``).
        warm_up: run one prediction before serving (vla-eval accepts connections as soon as
            the server is built).

    What an observation must hold: ``images`` (the cameras above, ``[H, W, 3]`` uint8,
    any size: the bundle resizes), ``task_description`` (str) and, when the policy reads
    it, the state (``[proprio_dim]`` float, finite). ``controller_states`` (LIBERO's
    controller-frame state) is not read; ``episode_restart`` (CALVIN's next subtask) drops
    the rest of the current chunk. Any other key is not read and is logged once as a
    warning. A bad observation raises an
    [ObservationError][vlakit.serve.ObservationError] naming the key and the expected
    shape; vla-eval records that episode as an error and goes on.
    """

    def __init__(
        self,
        bundle: PolicyBundle | str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        trust: tuple[str, ...] = (),
        cameras: Mapping[str, str] | Sequence[str] | None = None,
        state_key: str | None = None,
        seed: int = 0,
        replan: int | None = None,
        action_spec: str | Mapping[str, DimSpec] = "raw",
        state_format: str = "raw",
        observation_params: Mapping[str, Any] | None = None,
        max_batch_size: int = 1,
        max_wait_time: float = 0.01,
        warm_up: bool = True,
    ) -> None:
        self.bundle = self._load(bundle, device, dtype, trust)
        description = self.bundle.describe()
        self.chunk = description["action"]["chunk_size"]
        self.action_dim = description["action"]["action_dim"]
        self.state_dim = description["proprio_dim"]
        self.image_size = tuple(description["image_size"])
        replan = self.chunk if replan is None else replan
        if isinstance(replan, bool) or not isinstance(replan, int) or \
                not 1 <= replan <= self.chunk:
            raise ValueError(f"replan must be an integer in [1, {self.chunk}] (the bundle's "
                             f"chunk size), got {replan!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or \
                max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        super().__init__(chunk_size=replan, max_batch_size=max_batch_size,
                         max_wait_time=max_wait_time)
        self.replan = replan
        self.cameras = self._camera_map(cameras)
        self.state_key = self._check_state_key(state_key)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.action_spec = self._action_spec(action_spec)
        self.state_format = state_format
        self.observation_params = dict(observation_params or {})
        self._device = next(self.bundle.model.parameters()).device
        self._episodes: dict[str, str] = {}  # session -> "task name, episode index"
        self._warned: set[str] = set()
        if warm_up:
            _LOG.info("warm-up prediction %.0f ms", _warm_up(self.bundle))

    # -- construction ------------------------------------------------------------------------

    @staticmethod
    def _load(bundle, device, dtype, trust) -> PolicyBundle:
        if isinstance(bundle, PolicyBundle):
            if device is not None or dtype is not None or trust:
                raise ValueError("device, dtype and trust apply to a bundle directory; move "
                                 "or cast a PolicyBundle's model yourself")
            return bundle
        if not isinstance(bundle, (str, os.PathLike)):
            raise TypeError(f"bundle must be a PolicyBundle or a bundle directory, got "
                            f"{type(bundle).__name__}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return PolicyBundle.load(bundle, device=device, dtype=dtype, trust=tuple(trust))

    def _camera_map(self, cameras) -> dict[str, str] | None:
        """``{vla-eval name: bundle key}``, or ``None`` for "in arrival order"."""
        keys = self.bundle.keys.images
        if cameras is None:
            return None
        if isinstance(cameras, str):
            cameras = (cameras,)
        if not isinstance(cameras, Mapping):
            names = list(cameras)
            if len(names) != len(keys) or len(set(names)) != len(names):
                raise ValueError(f"cameras {names} must name {len(keys)} distinct vla-eval "
                                 f"image(s), one per bundle camera {list(keys)}, in that order")
            return dict(zip(names, keys))
        mapping = {str(k): str(v) for k, v in cameras.items()}
        unknown = sorted(v for v in mapping.values() if v not in keys)
        values = list(mapping.values())
        if unknown or sorted(values) != sorted(keys):
            raise ValueError(f"cameras {mapping} must map vla-eval image names onto the "
                             f"bundle's cameras {list(keys)}, each exactly once"
                             + (f" ({unknown} are not bundle cameras)" if unknown else ""))
        return mapping

    def _check_state_key(self, state_key: str | None) -> str | None:
        if state_key is not None and self.bundle.keys.state is None:
            raise ValueError(f"state_key={state_key!r}, but the policy reads no state "
                             f"(its keys: {list(self.bundle.keys.all)})")
        return state_key

    def _action_spec(self, spec: str | Mapping[str, DimSpec]) -> dict[str, DimSpec]:
        if isinstance(spec, str):
            if spec not in ACTION_SPECS:
                raise ValueError(f"action_spec {spec!r} is not one of {sorted(ACTION_SPECS)}; "
                                 f"or pass {{component: DimSpec}}")
            named = ACTION_SPECS[spec]
            if named is None:
                return {"actions": DimSpec("actions", self.action_dim, "raw",
                                           description="the bundle's unnormalised actions")}
            spec = named
        if not spec or not all(isinstance(v, DimSpec) for v in spec.values()):
            raise TypeError(f"action_spec must map component names to vla_eval DimSpecs, got "
                            f"{spec!r}")
        total = sum(v.dims for v in spec.values())
        if total != self.action_dim:
            raise ValueError(f"action_spec {sorted(spec)} adds up to {total} dims, but the "
                             f"bundle's actions have {self.action_dim}")
        return dict(spec)

    # -- vla-eval's specs ----------------------------------------------------------------------

    def get_action_spec(self) -> dict[str, DimSpec]:
        """The actions' components (``action_spec``), one action ``[action_dim]`` each step."""
        return dict(self.action_spec)

    def get_observation_spec(self) -> dict[str, DimSpec]:
        """The cameras (``rgb_hwc_uint8``), ``state`` (``[proprio_dim]``, when the policy reads
        it) and ``language``."""
        names = self.bundle.keys.images if self.cameras is None else tuple(self.cameras)
        spec = {name: IMAGE_RGB for name in names}
        if self.bundle.keys.state is not None:
            spec["state"] = DimSpec("state", self.state_dim or 0, self.state_format)
        spec["language"] = LANGUAGE
        return spec

    def get_observation_params(self) -> dict[str, Any]:
        """``observation_params`` (sent to the benchmark's constructor)."""
        return dict(self.observation_params)

    # -- observations --------------------------------------------------------------------------

    def to_bundle(self, obs: Any) -> dict[str, Any]:
        """The bundle's observation (its own keys) for a vla-eval observation, every field
        checked; an [ObservationError][vlakit.serve.ObservationError] names the key and
        what it expects."""
        if not isinstance(obs, Mapping):
            raise ObservationError(f"a vla-eval observation is a map, got a "
                                   f"{type(obs).__name__}")
        self._warn_unread(obs)
        keys = self.bundle.keys
        out = self._images(obs)
        if keys.state is not None:
            out[keys.state] = self._state(obs)
        prompt = obs.get("task_description")
        if not isinstance(prompt, str):
            raise ObservationError(
                f"'task_description' must be the instruction string, got "
                f"{'nothing' if prompt is None else type(prompt).__name__} (the observation "
                f"has {sorted(obs)})")
        out[keys.prompt] = prompt
        return out

    def _warn_unread(self, obs: Mapping) -> None:
        for key in obs:
            if key not in _KNOWN_KEYS and (self.state_key is None or key != self.state_key) \
                    and key not in self._warned:
                self._warned.add(key)
                _LOG.warning("observation key %r is not read by this policy (it reads images, "
                             "the state and task_description)", key)

    def _images(self, obs: Mapping) -> dict[str, Any]:
        images = obs.get("images")
        if not isinstance(images, Mapping):
            raise ObservationError(f"'images' must map camera names to [H, W, 3] uint8 "
                                   f"arrays, got {type(images).__name__} (the observation has "
                                   f"{sorted(obs)})")
        keys = self.bundle.keys.images
        if self.cameras is None:
            if len(images) != len(keys):
                raise ObservationError(
                    f"the observation has {len(images)} image(s) {list(images)} but the "
                    f"policy reads {len(keys)} {list(keys)}: name the cameras to use "
                    f"(cameras={{vla-eval name: bundle key}}, --camera NAME=KEY)")
            mapping = dict(zip(images, keys))
        else:
            missing = [name for name in self.cameras if name not in images]
            if missing:
                raise ObservationError(f"'images' lacks {missing} (the observation has "
                                       f"{list(images)}; cameras={self.cameras})")
            mapping = self.cameras
        out = {}
        for name, key in mapping.items():
            self._check_image(name, images[name])
            out[key] = images[name]
        return out

    def _check_image(self, name: str, image: Any) -> None:
        height, width = self.image_size
        expected = (f"[H, W, 3] uint8 (vla-eval's rgb_hwc_uint8, any size; the policy "
                    f"reads {height}x{width})")
        if not isinstance(image, np.ndarray):
            raise ObservationError(f"'images/{name}' must be an array {expected}, got a "
                                   f"{type(image).__name__}")
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ObservationError(f"'images/{name}' is {image.dtype} {list(image.shape)}, "
                                   f"expected {expected}")

    def _state(self, obs: Mapping) -> np.ndarray:
        if self.state_key is not None:
            key = self.state_key
            if key not in obs:
                raise ObservationError(f"the policy reads the state from {key!r}, which the "
                                       f"observation lacks (it has {sorted(obs)})")
        else:
            present = [k for k in STATE_KEYS if k in obs]
            if not present:
                raise ObservationError(
                    f"the policy reads a state, but the observation has neither 'state' nor "
                    f"'states' (it has {sorted(obs)}); enable the benchmark's state (LIBERO: "
                    f"send_state: true) or name the key (state_key=, --state-key)")
            if len(present) > 1:
                raise ObservationError("the observation has both 'state' and 'states': name "
                                       "the one to read (state_key=, --state-key)")
            key = present[0]
        state = obs[key]
        if isinstance(state, (list, tuple)):  # a benchmark that sends a plain list
            state = np.asarray(state)
        check_state(key, state, self.state_dim)
        return state.astype(np.float32)

    # -- inference -------------------------------------------------------------------------------

    def seed_for(self, ctx: SessionContext) -> int:
        """The sampling seed of the prediction at ``ctx.step``: from ``seed``, the episode
        (the task's name and ``episode_idx`` that vla-eval sends at the episode's start;
        vla-eval's episode id when none was sent) and the step, so a rerun draws the same
        noise whatever the batching."""
        episode = self._episodes.get(ctx.session_id, ctx.episode_id)
        return _stable_seed(self.seed, episode, ctx.step)

    def predict(self, obs: dict[str, Any], ctx: SessionContext) -> dict[str, np.ndarray]:
        """``{"actions": [chunk, action_dim]}`` float32 (unnormalised) for one observation."""
        return self.predict_batch([obs], [ctx])[0]

    def predict_batch(self, obs_batch: list[dict[str, Any]],
                      ctx_batch: list[SessionContext]) -> list[dict[str, np.ndarray]]:
        """One bundle call for the batch; each row draws from its own seeded generator, so a
        row equals its prediction alone."""
        observations = [self.to_bundle(obs) for obs in obs_batch]
        generators = tuple(torch.Generator(self._device).manual_seed(self.seed_for(ctx))
                           for ctx in ctx_batch)
        chunks = self.bundle(observations, Sampling(generator=generators))
        return [{"actions": np.ascontiguousarray(c, dtype=np.float32)} for c in chunks]

    # -- vla-eval's callbacks ----------------------------------------------------------------------

    async def on_observation(self, obs: dict[str, Any], ctx: SessionContext) -> None:
        """Check every observation (also those answered from the chunk); CALVIN's
        ``episode_restart`` drops the rest of the chunk."""
        self.to_bundle(obs)
        if isinstance(obs, Mapping) and obs.get("episode_restart"):
            self._chunk_buffers.pop(ctx.session_id, None)
        await super().on_observation(obs, ctx)

    async def on_episode_start(self, config: dict[str, Any], ctx: SessionContext) -> None:
        """Note the episode (task name, ``episode_idx``) the seeds derive from."""
        task = (config or {}).get("task") or {}
        if "name" in task or "episode_idx" in task:
            self._episodes[ctx.session_id] = f"{task.get('name', '')}#{task.get('episode_idx')}"
        else:
            self._episodes.pop(ctx.session_id, None)
        await super().on_episode_start(config, ctx)

    async def on_episode_end(self, result: dict[str, Any], ctx: SessionContext) -> None:
        self._episodes.pop(ctx.session_id, None)
        await super().on_episode_end(result, ctx)


# -- serving and the command line -----------------------------------------------------------------


def serve_vla_eval(bundle_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
                   **options: Any) -> None:
    """Load ``bundle_dir``, warm it up and serve it to vla-eval on ``ws://host:port`` until
    interrupted; ``options`` are [VlaEvalServer][vlakit.serve.vla_eval.VlaEvalServer]'s."""
    from vla_eval.model_servers.serve import serve

    server = VlaEvalServer(bundle_dir, **options)
    _LOG.info("serving %s (%s, chunk %d, replan %d, %d-d actions) to vla-eval on ws://%s:%d",
              bundle_dir, type(server.bundle.model.head).__name__, server.chunk,
              server.replan, server.action_dim, host, port)
    serve(server, host=host, port=port)


def _cameras(values: list[str]) -> dict[str, str] | list[str] | None:
    if not values:
        return None
    pairs = [v.split("=", 1) for v in values]
    if all(len(p) == 2 for p in pairs):
        return {name: key for name, key in pairs}
    if any(len(p) == 2 for p in pairs):
        raise SystemExit(f"--camera: give every camera as NAME (in the bundle's order) or "
                         f"every one as NAME=BUNDLE_KEY, not a mix: {values}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlakit.serve.vla_eval",
        description="Serve a policy bundle to the vla-evaluation harness (vla-eval run "
        "--no-docker -c CONFIG.yaml, with server.url ws://HOST:PORT).")
    p.add_argument("bundle", help="a policy bundle directory (PolicyBundle.save)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1; "
                   "0.0.0.0 for a benchmark in a container or on another machine)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (vla-eval's 8000)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype")
    p.add_argument("--trust", action="append", default=[], metavar="MODULE",
                   help="a module of your own the bundle's model names (repeatable)")
    p.add_argument("--camera", action="append", default=[], metavar="NAME[=KEY]",
                   help="a vla-eval image feeding a bundle camera (repeatable): NAME in the "
                   "bundle's camera order, or NAME=BUNDLE_KEY (default: the images in the "
                   "order they arrive)")
    p.add_argument("--state-key", default=None, help="observation key of the state "
                   "(default: 'state' or 'states', whichever is there)")
    p.add_argument("--seed", type=int, default=0, help="base of the per-episode sampling "
                   "seeds")
    p.add_argument("--replan", type=int, default=None, metavar="N",
                   help="actions of each chunk to execute before predicting again "
                   "(default: the whole chunk)")
    p.add_argument("--action-spec", choices=sorted(ACTION_SPECS), default="raw",
                   help="the action layout declared to vla-eval's spec check")
    p.add_argument("--state-format", default="raw", help="the state's convention declared "
                   "to the spec check (LIBERO: eef_pos3_axisangle3_gripper2)")
    p.add_argument("--max-batch-size", type=int, default=1,
                   help="observations of concurrent sessions (shards) per bundle call")
    p.add_argument("--max-wait-time", type=float, default=0.01,
                   help="seconds a batch waits to fill")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m vlakit.serve.vla_eval BUNDLE_DIR [options]``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    serve_vla_eval(args.bundle, host=args.host, port=args.port, device=args.device,
                   dtype=None if args.dtype is None else getattr(torch, args.dtype),
                   trust=tuple(args.trust), cameras=_cameras(args.camera),
                   state_key=args.state_key, seed=args.seed, replan=args.replan,
                   action_spec=args.action_spec, state_format=args.state_format,
                   max_batch_size=args.max_batch_size, max_wait_time=args.max_wait_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
