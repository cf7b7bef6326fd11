"""The Meta-World tasks of ``env.py`` as a benchmark of the vla-evaluation harness
(``vla-eval`` 0.8.0, which has no Meta-World benchmark of its own).

    python -m vlakit.serve.vla_eval BUNDLE_DIR --port 8765 --camera corner --replan 1 &
    PYTHONPATH=benchmarks/metaworld vla-eval run --no-docker --render cpu \\
        -c benchmarks/metaworld/vla_eval.yaml

What the model server gets each step: ``images`` ``{"corner": [64, 64, 3] uint8}`` (the
``corner`` camera, right side up), ``state`` ``[39]`` float32 (Meta-World's observation
with the goal in it, see ``env.py``) and ``task_description`` (the instruction of
``env.TASKS``). What it sends back: ``actions`` ``[4]`` (dx, dy, dz, gripper effort),
clipped to [-1, 1] by the env. An episode is a success as soon as Meta-World's
``info["success"]`` is set (the episode stops there), a failure after ``max_steps``
(``env.MAX_STEPS`` = 150 by default). Episode ``k`` of a task uses the layout seed
``seed + k``; the default ``seed`` 10000 keeps the layouts apart from the demonstrations'
(seeds 0 .. n - 1) and equal to ``run.py``'s held-out ones.

Rendering is OSMesa only (``--render cpu``: MUJOCO_GL=osmesa; EGL does not work on these
machines), with env.py's fast 64 px renderer. Nothing here imports torch; if something in
the process already has, ``torch._dynamo`` is imported before the first OSMesa render
(libtriton's LLVM, loaded after llvmpipe has rendered, segfaults).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from vla_eval.benchmarks.base import StepBenchmark, StepResult
from vla_eval.render import configure_mujoco_render
from vla_eval.specs import IMAGE_RGB, LANGUAGE, DimSpec
from vla_eval.types import Action, EpisodeResult, Observation, Task

CAMERA = "corner"
ACTION_SPEC = DimSpec("actions", 4, "raw", (-1.0, 1.0),
                      description="dx, dy, dz (hand motion), gripper effort (+1 closes); "
                      "clipped to [-1, 1]")
STATE_SPEC = DimSpec("state", 39, "raw",
                     description="Meta-World's observation: hand xyz, gripper opening, two "
                     "object poses (xyz + quaternion xyzw), the previous step's 18 values, "
                     "goal xyz")


class MetaWorldBenchmark(StepBenchmark):
    """Meta-World tasks (``env.TASKS``) for vla-eval.

    Args:
        tasks: the task names to offer (default: all of ``env.TASKS``); a config's
            ``tasks:`` filter picks among them too.
        seed: the layout seed of each task's episode 0; episode ``k`` uses ``seed + k``.
        image_size: the camera image's side in pixels.
        max_steps: the episode cap (default ``env.MAX_STEPS``); a config's ``max_steps``
            may only shorten it.
    """

    render_backends = frozenset({"cpu"})
    _ALL_RECORD_FIELDS = frozenset({"reward", "success", "action"})

    @classmethod
    def configure_render(cls, mode: str) -> dict[str, str]:
        """OSMesa (``MUJOCO_GL=osmesa``), set before env.py imports mujoco."""
        return configure_mujoco_render(mode)

    def __init__(self, tasks: list[str] | None = None, seed: int = 10_000,
                 image_size: int = 64, max_steps: int | None = None) -> None:
        super().__init__()
        if "torch" in sys.modules:  # see the module docstring: before any OSMesa context
            import torch._dynamo  # noqa: F401
        import env  # benchmarks/metaworld on PYTHONPATH; imports mujoco (after the render env)

        self._mw = env
        names = list(env.TASKS) if tasks is None else list(tasks)
        unknown = [t for t in names if t not in env.TASKS]
        if unknown or not names:
            raise ValueError(f"tasks {unknown or names} are not Meta-World tasks of env.py; "
                             f"choose from {list(env.TASKS)}")
        self.tasks, self.seed, self.image_size = names, int(seed), int(image_size)
        self.max_steps = env.MAX_STEPS if max_steps is None else int(max_steps)
        self._env = None

    def get_tasks(self) -> list[Task]:
        return [{"name": t, "suite": "metaworld", "instruction": self._mw.TASKS[t]}
                for t in self.tasks]

    def _env_for(self, name: str):
        """One env at a time (each holds a GL context), rebuilt when the task changes."""
        if self._env is None or self._env.task != name:
            self.cleanup()
            self._env = self._mw.make_env(name, seed=self.seed, image_size=self.image_size,
                                          max_steps=self.max_steps)
        return self._env

    def reset(self, task: Task) -> Any:
        env = self._env_for(task["name"])
        obs = env.reset(seed=self.seed + int(task.get("episode_idx", 0)))
        self._recorder.record_video(obs["image"])
        return obs

    def step(self, action: Action) -> StepResult:
        raw = action.get("actions", action.get("action")) if isinstance(action, dict) else None
        array = np.asarray(raw, dtype=np.float32) if raw is not None else None
        if array is None or array.shape != (4,):
            shape = "nothing" if array is None else f"shape {list(array.shape)}"
            raise ValueError(f"Meta-World takes one action 'actions' [4] (dx, dy, dz, grip) "
                             f"per step, got {shape}")
        obs, reward, success, info = self._env.step(array)
        self._recorder.record_video(obs["image"])
        self._recorder.record_step(reward=reward, success=success, action=array)
        return StepResult(obs=obs, reward=reward, done=success or info["truncated"], info=info)

    def make_obs(self, raw_obs: Any, task: Task) -> Observation:
        return {"images": {CAMERA: raw_obs["image"]}, "state": raw_obs["state"],
                "task_description": task["instruction"]}

    def get_step_result(self, step_result: StepResult) -> EpisodeResult:
        info = step_result.info
        return {"success": bool(info.get("success", False)),
                "steps": int(info.get("steps", 0))}

    def get_metric_keys(self) -> dict[str, str]:
        return {"success": "mean", "steps": "mean"}

    def get_metadata(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "suite": "metaworld"}

    def get_action_spec(self) -> dict[str, DimSpec]:
        return {"actions": ACTION_SPEC}

    def get_observation_spec(self) -> dict[str, DimSpec]:
        return {CAMERA: IMAGE_RGB, "state": STATE_SPEC, "language": LANGUAGE}

    def render(self) -> np.ndarray | None:
        return None if self._env is None else self._env.render()

    def cleanup(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
