"""Measure the Meta-World pitfalls that env.py handles, and print the numbers.

    MUJOCO_GL=osmesa /work/mw-venv/bin/python benchmarks/metaworld/check_env.py
    ... check_env.py --only a,b        # a subset
    ... check_env.py --save-images /tmp/mw-check   # also write PNGs to look at

a  seeding: MT1 replays fixed layouts; ours gives a new layout per seed
b  rendering speed: default vs fast 64x64 off-screen buffer
c  two rendering envs in one process
d  goal marker in the first frame after reset
e  the corner camera shows arm, object and goal, right side up
f  reach's goal: pixels in the image vs coordinates in the state
x  scripted-expert success per task at MAX_STEPS (table)

Each check asserts what it expects and prints what it measured.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import env as mw  # sets MUJOCO_GL / PYOPENGL_PLATFORM defaults
import numpy as np

warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
warnings.filterwarnings("ignore", module="gymnasium")

SAVE_DIR: str | None = None


def save(name: str, image: np.ndarray) -> None:
    """Write ``image`` as a PNG under --save-images (if given)."""
    if SAVE_DIR:
        import imageio.v2 as imageio  # metaworld depends on imageio

        os.makedirs(SAVE_DIR, exist_ok=True)
        big = image.repeat(4, axis=0).repeat(4, axis=1)
        imageio.imwrite(os.path.join(SAVE_DIR, name + ".png"), big)


def layout(raw_env) -> tuple:
    """Object and goal position of the current episode, rounded."""
    return tuple(np.round(np.r_[raw_env.obj_init_pos, raw_env._target_pos], 4))


# -- a ------------------------------------------------------------------------
def check_seeding(task: str = "push-v3") -> None:
    import gymnasium as gym
    import metaworld

    print(f"\n[a] seeding ({task})")
    mt1 = metaworld.MT1(task, seed=0)
    raw = mt1.train_classes[task]()
    raw.set_task(mt1.train_tasks[0])
    mt1_layouts = set()
    for s in range(10):
        raw.reset(seed=s)
        mt1_layouts.add(layout(raw))
    print(f"  MT1 env, set_task(task 0), reset(seed=0..9): {len(mt1_layouts)} distinct layout(s)")
    assert len(mt1_layouts) == 1

    bench = gym.make("Meta-World/MT1", env_name=task, seed=0)
    gym_layouts = set()
    for s in range(200):
        bench.reset(seed=s)
        gym_layouts.add(layout(bench.unwrapped))
    print(f"  gym.make('Meta-World/MT1'), 200 resets with seed=0..199: "
          f"{len(gym_layouts)} distinct layouts (its 50 fixed tasks)")
    assert len(gym_layouts) <= 50
    bench.close()

    env = mw.make_env(task, seed=0, render=False)
    ours = []
    for s in range(200):
        env.reset(seed=s)
        ours.append(layout(env.env))
    again = []
    for s in (3, 3, 150):
        env.reset(seed=s)
        again.append(layout(env.env))
    env.reset()  # no seed: next draw of the current stream
    other = mw.make_env(task, seed=3, render=False)
    other.reset()
    print(f"  ours, reset(seed=0..199): {len(set(ours))} distinct layouts")
    print(f"  ours, seed 3 twice / seed 3 in a fresh env / seed 150 again: "
          f"{again[0] == again[1] == ours[3]} / {layout(other.env) == ours[3]} / "
          f"{again[2] == ours[150]}")
    assert len(set(ours)) == 200 and again[0] == again[1] == ours[3] == layout(other.env)
    assert again[2] == ours[150]
    span = np.ptp(np.array(ours), axis=0)
    print(f"  ours, range of obj xyz / goal xyz over 200 seeds: {np.round(span[:3], 3)} / "
          f"{np.round(span[3:], 3)}")
    env.close()
    other.close()


# -- b ------------------------------------------------------------------------
def _steps_per_second(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - t0)


def check_speed(task: str = "pick-place-v3", n_default: int = 60, n_fast: int = 300) -> None:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    print(f"\n[b] steps/s with a 64x64 image every step ({task}, zero actions)")
    zero = np.zeros(4, dtype=np.float32)
    default = ALL_V3_ENVIRONMENTS[task](render_mode="rgb_array", camera_name=mw.CAMERA,
                                        width=64, height=64)
    default._set_task_called = True
    default._freeze_rand_vec = False
    default.seed(0)
    default.reset()
    q, g = default.model.vis.quality, default.model.vis.global_
    print(f"  metaworld defaults: shadowsize={q.shadowsize} offsamples={q.offsamples} "
          f"offwidth x offheight={g.offwidth}x{g.offheight}")
    default.step(zero), default.render()  # first render builds the GL context
    sps_default = _steps_per_second(lambda: (default.step(zero), default.render()), n_default)
    default.close()

    fast = mw.make_env(task, seed=0)
    fast.reset()
    q, g = fast.env.model.vis.quality, fast.env.model.vis.global_
    print(f"  fast: shadowsize={q.shadowsize} offsamples={q.offsamples} "
          f"offwidth x offheight={g.offwidth}x{g.offheight}, no shadow/reflection flags")
    fast.step(zero)
    sps_fast = _steps_per_second(lambda: fast.step(zero), min(n_fast, fast.max_steps - 2))
    fast.close()

    bare = mw.make_env(task, seed=0, render=False)
    bare.reset()
    sps_bare = _steps_per_second(lambda: bare.step(zero), min(n_fast, bare.max_steps - 1))
    bare.close()
    print(f"  default render: {sps_default:6.1f} steps/s")
    print(f"  fast render:    {sps_fast:6.1f} steps/s  ({sps_fast / sps_default:.1f}x)")
    print(f"  no render:      {sps_bare:6.1f} steps/s")


# -- c ------------------------------------------------------------------------
def _frames(env, seed: int, n: int = 5) -> list[np.ndarray]:
    env.reset(seed=seed)
    return [env.step(np.zeros(4))[0]["image"] for _ in range(n)]


def check_two_envs() -> None:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    print("\n[c] two rendering envs in one process, stepped and rendered alternately")
    tasks = ("reach-v3", "door-open-v3")
    solo = {}
    for task in tasks:  # reference frames: each env alone in the process
        env = mw.make_env(task)
        solo[task] = _frames(env, seed=0)
        env.close()
    a, b = (mw.make_env(t) for t in tasks)
    a.reset(seed=0), b.reset(seed=0)
    err_a = err_b = 0
    for i in range(5):
        ia = a.step(np.zeros(4))[0]["image"]
        ib = b.step(np.zeros(4))[0]["image"]
        err_a = max(err_a, np.abs(ia.astype(int) - solo[tasks[0]][i]).max())
        err_b = max(err_b, np.abs(ib.astype(int) - solo[tasks[1]][i]).max())
    diff = np.abs(ia.astype(int) - ib).mean()
    print("  ours (mujoco.Renderer, context made current in each render): max "
          f"|alternating - solo| "
          f"= {err_a} / {err_b}; mean |A - B| = {diff:.1f}")
    save("c_two_envs", np.concatenate([ia, ib], axis=1))
    assert err_a == 0 and err_b == 0 and diff > 1
    a.close(), b.close()

    # The same with gymnasium's env.render(): MujocoRenderer only makes the
    # context current when one env has several viewers.
    def gym_env(task):
        e = ALL_V3_ENVIRONMENTS[task](render_mode="rgb_array", camera_name=mw.CAMERA,
                                      width=64, height=64)
        e._set_task_called, e._freeze_rand_vec, e.seeded_rand_vec = True, False, True
        e.seed(0)
        e.reset()
        e.render()  # build its GL context now
        return e

    ga, gb = gym_env(tasks[0]), gym_env(tasks[1])
    ra = ga.render()  # rendered while gb's context is current
    ga.mujoco_renderer.viewer.make_context_current()
    ra_ok = ga.render()
    print(f"  gymnasium env.render(), A rendered while B's context is current: "
          f"max |wrong - right| = {np.abs(ra.astype(int) - ra_ok).max()}")
    save("c_gym_wrong_context", np.concatenate([ra, ra_ok], axis=1)[::-1, ::-1])
    ga.close(), gb.close()


# -- d, e, f helpers ------------------------------------------------------------
def site_mask(env, site: str = "goal") -> np.ndarray:
    """Pixels of ``site`` in the current frame (render with it hidden, diff)."""
    model = env.env.model
    sid = model.site(site).id
    shown = env.render()
    rgba = model.site_rgba[sid].copy()
    model.site_rgba[sid, 3] = 0.0
    hidden = env.render()
    model.site_rgba[sid] = rgba
    return np.abs(shown.astype(int) - hidden).sum(-1) > 0


def iou(m1: np.ndarray, m2: np.ndarray) -> float:
    union = (m1 | m2).sum()
    return float((m1 & m2).sum() / union) if union else 1.0


def project(env, xyz) -> np.ndarray:
    """(row, col) of world point ``xyz`` in our (rotated) image, pixel units."""
    model, data, size = env.env.model, env.env.data, env.image_size
    cid = model.camera(mw.CAMERA).id
    cam = data.cam_xmat[cid].reshape(3, 3).T @ (np.asarray(xyz) - data.cam_xpos[cid])
    focal = size / 2 / np.tan(np.radians(model.cam_fovy[cid]) / 2)
    col_gl = size / 2 + focal * cam[0] / -cam[2]
    row_gl = size / 2 - focal * cam[1] / -cam[2]  # mujoco.Renderer rows: top first
    return np.array([size - row_gl, size - col_gl])  # after the 180-degree rotation


def centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean() + 0.5, cols.mean() + 0.5])


# -- d ------------------------------------------------------------------------
def check_goal_after_reset(tasks=("reach-v3", "push-v3", "pick-place-v3", "drawer-close-v3"),
                           seed: int = 1) -> None:
    print("\n[d] goal marker in the first frame after reset (seed 1, after a seed-0 episode)")
    for task in tasks:
        env = mw.make_env(task)
        env.reset(seed=0)
        env.env.seed(seed)
        env.env.reset()  # metaworld's reset alone
        raw_err = np.linalg.norm(env.env.data.site("goal").xpos - env.env._target_pos)
        raw_mask = site_mask(env)
        env.reset(seed=seed)  # ours: reset + sync_goal_sites
        err = np.linalg.norm(env.env.data.site("goal").xpos - env.env._target_pos)
        mask = site_mask(env)
        env.step(np.zeros(4))
        step_mask = site_mask(env)
        print(f"  {task:16s} |goal site - goal| after reset: raw {raw_err:.3f} m, "
              f"ours {err:.3f} m; marker IoU with frame after step 1: raw "
              f"{iou(raw_mask, step_mask):.2f} ({raw_mask.sum()} px), "
              f"ours {iou(mask, step_mask):.2f} ({step_mask.sum()} px)")
        assert err < 1e-6 and iou(mask, step_mask) > 0.5
        env.close()


# -- e ------------------------------------------------------------------------
def check_camera(seed: int = 0) -> None:
    print("\n[e] corner camera: where hand, object and goal project in the 64 px image")
    for task in mw.TASKS:
        env = mw.make_env(task)
        obs = env.reset(seed=seed)
        save(f"e_{task}", obs["image"])
        points = {"hand": obs["state"][:3], "object": obs["state"][4:7], "goal": obs["goal_pos"]}
        pix = {k: project(env, v) for k, v in points.items()}
        inside = all(((p >= 0) & (p < env.image_size)).all() for p in pix.values())
        text = ", ".join(f"{k} ({p[0]:.0f},{p[1]:.0f})" for k, p in pix.items())
        line = f"  {task:24s} row,col: {text}; all inside: {inside}"
        try:
            mask = site_mask(env)
        except KeyError:
            mask = None
        if mask is not None and mask.any():
            off = np.linalg.norm(centroid(mask) - pix["goal"])
            line += f"; goal marker {mask.sum()} px, {off:.1f} px from projected goal"
        up = project(env, points["hand"] + [0, 0, 0.1])[0] < pix["hand"][0]
        print(line + f"; world up is image up: {up}")
        assert inside and up
        env.close()


# -- f ------------------------------------------------------------------------
def check_goal_observed(task: str = "reach-v3", seeds=range(10)) -> None:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    print(f"\n[f] {task}: goal in the image vs in the state")
    env = mw.make_env(task)
    sizes, gaps = [], []
    for s in seeds:
        obs = env.reset(seed=s)
        sizes.append(site_mask(env).sum())
        gaps.append(np.abs(obs["state"][36:39] - env.env._target_pos).max())
    print(f"  goal marker at 64 px: {min(sizes)}-{max(sizes)} px (median {np.median(sizes):.0f}) "
          f"over {len(sizes)} seeds")
    print(f"  ours: max |state[36:39] - goal| = {max(gaps):.1e} (goal observed)")
    default = ALL_V3_ENVIRONMENTS[task]()
    default._set_task_called, default._freeze_rand_vec = True, False
    default.seed(0)
    state, _ = default.reset()
    print(f"  metaworld default _partially_observable={default._partially_observable}: "
          f"state[36:39] = {state[36:39]}")
    default.close()
    blind = 0
    for s in seeds:  # the scripted expert with the goal zeroed, as MT1 gives it
        obs = env.reset(seed=s)
        for _ in range(env.max_steps):
            state = obs["state"].copy()
            state[36:39] = 0
            obs, _, success, _ = env.step(env.expert_action(state))
            if success:
                blind += 1
                break
    print(f"  scripted expert with the goal zeroed: {blind}/{len(seeds)} successes")
    env.close()


# -- x ------------------------------------------------------------------------
def check_expert(n_seeds: int = 50) -> None:
    print(f"\n[x] scripted expert, seeds 0..{n_seeds - 1}, cap {mw.MAX_STEPS} steps")
    rows = [mw.expert_success(task, range(n_seeds)) for task in mw.TASKS]
    mw.print_expert_table(rows)


CHECKS = {"a": check_seeding, "b": check_speed, "c": check_two_envs,
          "d": check_goal_after_reset, "e": check_camera, "f": check_goal_observed,
          "x": check_expert}


def main() -> None:
    global SAVE_DIR
    parser = argparse.ArgumentParser(description="Meta-World env checks")
    parser.add_argument("--only", default=",".join(CHECKS), help="comma-separated: a,b,c,d,e,f,x")
    parser.add_argument("--expert-seeds", type=int, default=50)
    parser.add_argument("--save-images", default=None, metavar="DIR")
    args = parser.parse_args()
    SAVE_DIR = args.save_images
    print(f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}")
    for key in args.only.split(","):
        if key == "x":
            check_expert(args.expert_seeds)
        else:
            CHECKS[key]()


if __name__ == "__main__":
    main()
