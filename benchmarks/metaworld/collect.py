"""Collect scripted-expert demonstrations from Meta-World (see env.py);
``run.py collect`` writes them as one LeRobot v3 folder (``vlakit.data.LeRobotWriter``).

Each episode is a dict of numpy arrays::

    image       [T, 64, 64, 3] uint8    corner camera, right side up
    state       [T, 39] float32         Meta-World observation (goal included)
    action      [T, 4] float32          clean expert action at that state (label)
    success     bool
    instruction str
    task, seed

Frame ``t`` is the observation the action ``t`` was chosen at. With
``action_noise > 0`` the env executes ``clip(expert + N(0, noise^2), -1, 1)``
while the recorded label stays the clean expert action (DART-style: the data
covers the states a slightly-off policy reaches, labelled with how to
recover). Only successful episodes are yielded; an episode ends
``steps_after_success`` steps after the first success (or at the step cap).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

try:  # run as a script or imported as a package module
    from .env import MAX_STEPS, make_env
except ImportError:
    from env import MAX_STEPS, make_env


def rollout(env, seed: int, action_noise: float, rng: np.random.Generator,
            steps_after_success: int = 5) -> dict[str, Any]:
    """One expert episode on ``env`` (a :class:`env.MetaWorldEnv`)."""
    obs = env.reset(seed=seed)
    images, states, actions = [], [], []
    success_at = None
    for t in range(env.max_steps):
        label = env.expert_action(obs["state"])
        images.append(obs["image"])
        states.append(obs["state"])
        actions.append(label)
        executed = label
        if action_noise > 0:
            executed = np.clip(label + rng.normal(0.0, action_noise, size=4), -1, 1)
        obs, _, success, _ = env.step(executed)
        if success and success_at is None:
            success_at = t
        if success_at is not None and t - success_at >= steps_after_success:
            break
    return {
        "image": np.stack(images).astype(np.uint8),
        "state": np.stack(states).astype(np.float32),
        "action": np.stack(actions).astype(np.float32),
        "success": success_at is not None,
        "instruction": env.instruction,
        "task": env.task,
        "seed": int(seed),
    }


def collect_episodes(task: str, seeds: Iterable[int], action_noise: float = 0.0,
                     image_size: int = 64, max_steps: int = MAX_STEPS,
                     steps_after_success: int = 5) -> Iterator[dict[str, Any]]:
    """Yield successful expert episodes of ``task``, one per seed that succeeds.

    The noise RNG is seeded from each layout seed, so a (task, seed,
    action_noise) triple always gives the same episode.
    """
    env = make_env(task, image_size=image_size, max_steps=max_steps)
    try:
        for seed in seeds:
            rng = np.random.default_rng([int(seed), 7919])
            episode = rollout(env, seed, action_noise, rng, steps_after_success)
            if episode["success"]:
                yield episode
    finally:
        env.close()
