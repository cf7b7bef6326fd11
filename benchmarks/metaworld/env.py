"""Meta-World tasks behind a small, seeded, fast-rendering interface.

Used by the data collector (``collect.py``), the policy-server eval loop and
the vla-eval benchmark class. Depends on numpy, metaworld, mujoco and
gymnasium only (no torch). Tested with metaworld 3.1.1 / mujoco 3.3.0 /
gymnasium 1.4.0 (see README.md for the pins).

Set ``MUJOCO_GL=osmesa`` (and ``PYOPENGL_PLATFORM=osmesa``) before importing
this module on a headless machine; this module sets both as defaults.

Observation (``obs`` dict returned by ``reset()`` and ``step()``):

* ``image``: uint8 ``[H, W, 3]`` (default 64x64) from the ``corner`` camera,
  rotated 180 degrees so it is right side up (that camera's XML frame has
  its y axis pointing down; a 180-degree rotation is the view of the same
  camera rolled upright, whereas a vertical flip alone would mirror it).
  ``None`` when the env was made with ``render=False``.
* ``state``: float32 ``[39]``, the Meta-World observation::

      [0:3]   end-effector (hand) xyz
      [3]     gripper opening, 0 (closed) .. 1 (open)
      [4:18]  object poses: up to two (xyz + quaternion xyzw), zero padded
      [18:36] the same 18 values from the previous step (frame stack)
      [36:39] goal xyz

  Meta-World zeroes the goal (``_partially_observable = True``) by default
  and MT1 keeps it zeroed. We set ``_partially_observable = False``, so the
  goal **is** in the state: the scripted experts read it from ``state[-3:]``,
  and at 64 px reach's goal marker is only a 1-2 px dot, so a policy could
  not find it from the image alone.
* ``goal_pos``: float32 ``[3]``, the goal (same as ``state[36:39]``).

Seeding: MT1 ignores ``reset(seed=)`` and replays 50 fixed layouts. Here the
env's own RNG (``np_random``, which samples ``_random_reset_space``) is
seeded and position sampling is unfrozen, so every seed gives a new layout
and the same seed gives the same one.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")

from typing import Any  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

#: task name (as in the installed metaworld) -> English instruction.
TASKS: dict[str, str] = {
    "reach-v3": "reach the goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick and place the puck",
    "door-open-v3": "open the door",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from above",
}

#: Episode cap (steps) for every task; the scripted expert succeeds within
#: it on >= 98% of seeds (see README.md, ``check_env.py --expert``).
MAX_STEPS = 150

CAMERA = "corner"


class MetaWorldEnv:
    """One Meta-World task with seeded layouts and 64 px off-screen images.

    Make it with :func:`make_env`. ``step`` returns
    ``(obs, reward, success, info)``; ``info`` is Meta-World's info dict plus
    ``"steps"`` and ``"truncated"`` (``True`` once ``max_steps`` is reached;
    stepping further raises).
    """

    def __init__(
        self,
        task: str,
        seed: int = 0,
        image_size: int = 64,
        max_steps: int = MAX_STEPS,
        render: bool = True,
        fast_render: bool = True,
    ):
        if task not in ALL_V3_ENVIRONMENTS:
            raise KeyError(f"unknown Meta-World task {task!r}")
        self.task = task
        self.instruction = TASKS.get(task, task.rsplit("-v", 1)[0].replace("-", " "))
        self.image_size = image_size
        self.max_steps = max_steps
        self.steps = 0
        self.seed = seed
        self.env = _make_raw_env(task)
        self.policy = ENV_POLICY_MAP[task]()
        self.renderer = _make_renderer(self.env.model, image_size, fast_render) if render else None
        self.env.seed(seed)

    # -- episode -----------------------------------------------------------
    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Start an episode; ``seed`` (if given) reseeds the layout RNG first."""
        if seed is not None:
            self.seed = seed
            self.env.seed(seed)
        state, _ = self.env.reset()
        sync_goal_sites(self.env)
        self.steps = 0
        return self._obs(state)

    def step(self, action) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """Apply a 4-d action (dx, dy, dz, grip) clipped to [-1, 1]."""
        if self.steps >= self.max_steps:
            raise RuntimeError(f"episode is over ({self.max_steps} steps); call reset()")
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        state, reward, _, _, info = self.env.step(action)
        self.steps += 1
        info = dict(info, steps=self.steps, truncated=self.steps >= self.max_steps)
        return self._obs(state), float(reward), bool(info["success"]), info

    def expert_action(self, state) -> np.ndarray:
        """The task's scripted policy (metaworld.policies) at ``state`` [39]."""
        action = self.policy.get_action(np.asarray(state, dtype=np.float64))
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    # -- rendering ---------------------------------------------------------
    def render(self) -> np.ndarray:
        """The current ``corner`` view, uint8 [H, W, 3], right side up."""
        if self.renderer is None:
            raise RuntimeError("made with render=False")
        self.renderer.update_scene(self.env.data, camera=CAMERA)
        # mujoco.Renderer.render() makes this env's GL context current
        # before drawing, so several envs can render alternately.
        return self.renderer.render()[::-1, ::-1].copy()

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        self.env.close()

    def _obs(self, state: np.ndarray) -> dict[str, Any]:
        state = np.asarray(state, dtype=np.float32)
        return {
            "image": self.render() if self.renderer is not None else None,
            "state": state,
            "goal_pos": np.asarray(self.env._target_pos, dtype=np.float32).copy(),
        }


def make_env(task: str, seed: int = 0, image_size: int = 64, **kwargs) -> MetaWorldEnv:
    """A :class:`MetaWorldEnv`; ``kwargs``: max_steps, render, fast_render."""
    return MetaWorldEnv(task, seed=seed, image_size=image_size, **kwargs)


# -- pieces (also used by check_env.py) -------------------------------------
def _make_raw_env(task: str):
    """The bare SawyerXYZEnv: goal observed, layouts drawn from its own RNG.

    ``seeded_rand_vec`` makes ``_get_state_rand_vec`` sample with
    ``self.np_random`` (seeded by ``env.seed``) rather than the global
    ``np.random``; ``_freeze_rand_vec = False`` makes it sample anew on every
    reset instead of replaying a fixed MT1 layout; ``_set_task_called``
    lets us step without an MT1 ``Task``.
    """
    env = ALL_V3_ENVIRONMENTS[task]()
    env._partially_observable = False
    del env.sawyer_observation_space  # cached_property: recompute goal bounds
    env.observation_space = env.sawyer_observation_space
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    return env


def _make_renderer(model, size: int, fast: bool = True) -> mujoco.Renderer:
    """A ``size`` x ``size`` off-screen renderer.

    The Meta-World XML asks for 4096^2 shadow maps and a 640x480 buffer with
    4x multisampling (~12-14 rendered steps/s here). ``fast`` drops shadows,
    reflections and anti-aliasing and sizes the buffer to the image
    (~130 steps/s). Must run before the first ``MjrContext`` is made for
    ``model`` (i.e. before anything else renders it).
    """
    if fast:
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = size
        model.vis.global_.offheight = size
    renderer = mujoco.Renderer(model, height=size, width=size)
    if fast:
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
    return renderer


def sync_goal_sites(env) -> None:
    """Put the goal markers where ``step()`` would put them.

    ``reset_model`` moves the goal site in the model after its last
    ``mj_forward``, and ``step`` re-places target sites and calls
    ``mj_forward``; without this the first frame shows the previous
    episode's (or the XML default) goal position.
    """
    for name, pos in env._target_site_config:
        env._set_pos_site(name, pos)
    mujoco.mj_forward(env.model, env.data)


# -- expert -----------------------------------------------------------------
def run_expert(env: MetaWorldEnv, seed: int) -> tuple[bool, int]:
    """One scripted-expert episode: (success, steps to first success)."""
    obs = env.reset(seed=seed)
    for t in range(1, env.max_steps + 1):
        obs, _, success, _ = env.step(env.expert_action(obs["state"]))
        if success:
            return True, t
    return False, env.max_steps


def expert_success(task: str, seeds, max_steps: int = MAX_STEPS) -> dict[str, Any]:
    """Scripted-expert success rate over ``seeds`` at ``max_steps`` (no rendering).

    Returns ``{"task", "n", "success_rate", "median_steps", "steps"}``;
    ``median_steps`` is over successful episodes only.
    """
    env = make_env(task, render=False, max_steps=max_steps)
    results = [run_expert(env, s) for s in seeds]
    env.close()
    steps = [t for ok, t in results if ok]
    return {
        "task": task,
        "n": len(results),
        "success_rate": len(steps) / max(len(results), 1),
        "median_steps": float(np.median(steps)) if steps else float("nan"),
        "steps": steps,
    }


def print_expert_table(rows) -> None:
    """Print rows from :func:`expert_success` as a table."""
    print(f"{'task':26s} {'n':>3s} {'success':>8s} {'median steps':>13s} {'max steps':>10s}")
    for r in rows:
        worst = max(r["steps"]) if r["steps"] else float("nan")
        print(f"{r['task']:26s} {r['n']:3d} {r['success_rate']:8.0%} "
              f"{r['median_steps']:13.0f} {worst:10.0f}")
