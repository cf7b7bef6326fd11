"""The vla-eval model-server adapter (vlakit.serve.vla_eval) against vla-eval 0.8.0 itself:
the adapter gives what the bundle gives, batching is invisible, the specs, the errors, and
whole runs of vla-eval's own orchestrator on a tiny benchmark defined here."""

from typing import Any

import anyio
import numpy as np
import pytest
import torch

pytest.importorskip("vla_eval")
from _tiny import tiny_flow_vla  # noqa: E402
from vla_eval.api import evaluate  # noqa: E402
from vla_eval.benchmarks.base import StepBenchmark, StepResult  # noqa: E402
from vla_eval.model_servers.base import SessionContext  # noqa: E402
from vla_eval.specs import IMAGE_RGB, LANGUAGE, DimSpec  # noqa: E402

from vlakit.bundle import ObservationKeys, PolicyBundle  # noqa: E402
from vlakit.heads import Sampling  # noqa: E402
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer  # noqa: E402
from vlakit.serve import ObservationError  # noqa: E402
from vlakit.serve.vla_eval import VlaEvalServer, main  # noqa: E402

KEYS = ObservationKeys(images=("observation/image", "observation/wrist_image"),
                       state="observation/state", prompt="prompt")
TASKS = ["pick up the red block", "open the drawer"]
CAMERAS = {"agentview": "observation/image", "wrist": "observation/wrist_image"}


def _bundle() -> PolicyBundle:
    """Two cameras, a 5-d state, a flow head drawing chunks of 4 actions of 3 dims."""
    model = tiny_flow_vla()
    processor = OpenVLAProcessor.from_model(word_tokenizer([OPENVLA_PROMPT, *TASKS]), model)
    return PolicyBundle(model, processor, KEYS)


@pytest.fixture(scope="module")
def bundle() -> PolicyBundle:
    return _bundle()


def _obs(seed: int = 0, task: str = TASKS[0], state_key: str = "states") -> dict:
    """A vla-eval observation as LIBERO sends one (``states``, two cameras)."""
    rng = np.random.default_rng(seed)
    return {"images": {"agentview": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       "wrist": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)},
            state_key: rng.standard_normal(5).astype(np.float32), "task_description": task}


def _as_bundle(obs: dict) -> dict:
    return {"observation/image": obs["images"]["agentview"],
            "observation/wrist_image": obs["images"]["wrist"],
            "observation/state": obs.get("states", obs.get("state")),
            "prompt": obs["task_description"]}


def _ctx(server: VlaEvalServer, task: str, episode_idx: int, step: int,
         session: str = "s") -> SessionContext:
    """The context vla-eval gives ``predict`` at ``step`` of that episode."""
    ctx = SessionContext(session_id=session, episode_id=f"uuid-{session}")
    anyio.run(server.on_episode_start, {"task": {"name": task, "episode_idx": episode_idx}},
              ctx)
    for _ in range(step):
        ctx._increment_step()
    return ctx


def _alone(bundle: PolicyBundle, obs: dict, seed: int) -> np.ndarray:
    return bundle(_as_bundle(obs), Sampling(generator=torch.Generator().manual_seed(seed)))


def test_predict_is_the_bundle_with_the_episodes_seed(bundle):
    server = VlaEvalServer(bundle, cameras=CAMERAS, seed=3)
    ctx = _ctx(server, TASKS[0], 2, 0)
    out = server.predict(_obs(), ctx)
    assert set(out) == {"actions"}
    assert out["actions"].shape == (4, 3) and out["actions"].dtype == np.float32
    np.testing.assert_allclose(out["actions"], _alone(bundle, _obs(), server.seed_for(ctx)),
                               atol=1e-6)
    # the seed is a function of (seed, task, episode, step) only: a new server, a new
    # session (another vla-eval episode id) give the same; another step or episode do not
    seed = server.seed_for(ctx)
    again = VlaEvalServer(bundle, cameras=CAMERAS, seed=3, warm_up=False)
    assert again.seed_for(_ctx(again, TASKS[0], 2, 0, session="t")) == seed
    other = VlaEvalServer(bundle, cameras=CAMERAS, seed=4, warm_up=False)
    others = {server.seed_for(_ctx(server, TASKS[0], 2, 4, session="a")),
              server.seed_for(_ctx(server, TASKS[0], 3, 0, session="b")),
              server.seed_for(_ctx(server, TASKS[1], 2, 0, session="c")),
              other.seed_for(_ctx(other, TASKS[0], 2, 0))}
    assert seed not in others and len(others) == 4
    # the default mapping (images in arrival order) and the 'state' key give the same
    default = VlaEvalServer(bundle, seed=3, warm_up=False)
    np.testing.assert_allclose(default.predict(_obs(state_key="state"),
                                               _ctx(default, TASKS[0], 2, 0))["actions"],
                               out["actions"], atol=1e-6)


def test_predict_batch_equals_predicts_one_by_one(bundle):
    server = VlaEvalServer(bundle, cameras=["agentview", "wrist"], max_batch_size=4,
                           warm_up=False)
    observations = [_obs(i, TASKS[i % 2]) for i in range(3)]
    contexts = [_ctx(server, TASKS[i % 2], i, 4 * i, session=str(i)) for i in range(3)]
    batched = server.predict_batch(observations, contexts)
    assert len(batched) == 3
    for obs, ctx, out in zip(observations, contexts, batched):
        np.testing.assert_allclose(out["actions"], server.predict(obs, ctx)["actions"],
                                   atol=1e-5)


def test_the_specs_come_from_the_bundle(bundle):
    server = VlaEvalServer(bundle, cameras=CAMERAS, state_format="eef_pos3_axisangle3_gripper2",
                           observation_params={"send_state": True}, warm_up=False)
    action = server.get_action_spec()
    assert list(action) == ["actions"] and action["actions"].dims == 3
    assert action["actions"].format == "raw"
    assert server.get_observation_spec() == {
        "agentview": IMAGE_RGB, "wrist": IMAGE_RGB,
        "state": DimSpec("state", 5, "eef_pos3_axisangle3_gripper2"), "language": LANGUAGE}
    assert server.get_observation_params() == {"send_state": True}
    assert server.chunk_size == 4 and server.replan == 4  # vla-eval executes the chunk
    assert VlaEvalServer(bundle, replan=2, warm_up=False).chunk_size == 2
    custom = {"position": DimSpec("position", 2, "delta_xy"),
              "gripper": DimSpec("gripper", 1, "binary_close_positive")}
    assert VlaEvalServer(bundle, action_spec=custom, warm_up=False).get_action_spec() == custom
    with pytest.raises(ValueError, match=r"adds up to 7 dims, but the bundle's actions have 3"):
        VlaEvalServer(bundle, action_spec="libero", warm_up=False)
    with pytest.raises(ValueError, match=r"replan must be an integer in \[1, 4\]"):
        VlaEvalServer(bundle, replan=5, warm_up=False)
    with pytest.raises(ValueError, match=r"each exactly once"):
        VlaEvalServer(bundle, cameras={"agentview": "observation/image"}, warm_up=False)


def test_bad_observations_name_the_key_and_the_shape(bundle):
    server = VlaEvalServer(bundle, cameras=CAMERAS, warm_up=False)
    ctx = _ctx(server, TASKS[0], 0, 0)
    obs = _obs()
    del obs["images"]["wrist"]
    with pytest.raises(ObservationError, match=r"'images' lacks \['wrist'\]"):
        server.predict(obs, ctx)
    obs = _obs()
    del obs["states"]
    with pytest.raises(ObservationError, match=r"neither 'state' nor 'states'"):
        server.predict(obs, ctx)
    obs = _obs()
    obs["states"] = obs["states"][:4]
    with pytest.raises(ObservationError, match=r"'states' has shape \[4\], expected \[5\] float"):
        server.predict(obs, ctx)
    obs = _obs()
    obs["images"]["agentview"] = obs["images"]["agentview"].astype(np.float32)
    with pytest.raises(ObservationError, match=r"'images/agentview' is float32 \[32, 32, 3\], "
                                               r"expected \[H, W, 3\] uint8"):
        server.predict(obs, ctx)
    explicit = VlaEvalServer(bundle, cameras=CAMERAS, state_key="proprio", warm_up=False)
    with pytest.raises(ObservationError, match=r"from 'proprio', which the observation lacks"):
        explicit.predict(_obs(), ctx)
    # the default mapping with a third camera: both sets are named
    default = VlaEvalServer(bundle, warm_up=False)
    obs = _obs()
    obs["images"]["side"] = obs["images"]["wrist"]
    with pytest.raises(ObservationError, match=r"3 image\(s\) \['agentview', 'wrist', 'side'\] "
                                               r"but the policy reads 2 \['observation/image', "
                                               r"'observation/wrist_image'\]"):
        default.predict(obs, ctx)


# -- whole runs of vla-eval's orchestrator ---------------------------------------------------


class TinyBenchmark(StepBenchmark):
    """Two tasks of ``length`` steps (a chunk of 4 runs out mid-episode), LIBERO-shaped
    observations from (task, episode, step); every action received is kept in
    ``received[(task, episode)]``."""

    render_backends = frozenset({"gpu", "cpu"})
    received: dict[tuple[str, int], list[np.ndarray]] = {}

    @classmethod
    def configure_render(cls, mode: str) -> dict[str, str]:
        return {}  # nothing renders

    def __init__(self, length: int = 6, seed: int = 0) -> None:
        super().__init__()
        self.length, self.seed = length, seed
        self._t, self._key = 0, None

    def get_tasks(self) -> list[dict[str, Any]]:
        return [{"name": task, "suite": "tiny", "index": i} for i, task in enumerate(TASKS)]

    def reset(self, task):
        self._t, self._key = 0, (task["name"], task["episode_idx"])
        TinyBenchmark.received[self._key] = []
        return 0

    def step(self, action):
        TinyBenchmark.received[self._key].append(np.asarray(action["actions"]))
        self._t += 1
        return StepResult(obs=self._t, reward=0.0, done=self._t >= self.length, info={})

    def make_obs(self, raw_obs, task):
        return observation_at(task["index"], task["episode_idx"], raw_obs)

    def get_step_result(self, step_result):
        return {"success": False}

    def get_metadata(self):
        return {"max_steps": self.length}

    def get_action_spec(self):
        return {"actions": DimSpec("actions", 3, "raw")}

    def get_observation_spec(self):
        return {"agentview": IMAGE_RGB, "wrist": IMAGE_RGB, "language": LANGUAGE,
                "state": DimSpec("state", 5, "raw")}


def observation_at(task_index: int, episode: int, step: int) -> dict:
    return _obs(1000 * task_index + 100 * episode + step, TASKS[task_index])


def _expected(server: VlaEvalServer, bundle: PolicyBundle, task_index: int, episode: int,
              length: int) -> np.ndarray:
    """The actions the benchmark should get: a chunk predicted every ``replan`` steps."""
    actions = []
    for step in range(0, length, server.replan):
        ctx = _ctx(server, TASKS[task_index], episode, step)
        chunk = _alone(bundle, observation_at(task_index, episode, step), server.seed_for(ctx))
        actions.extend(chunk[: server.replan])
    return np.stack(actions[:length])


def _run(server: VlaEvalServer) -> dict:
    TinyBenchmark.received = {}
    config = {"benchmarks": [{"benchmark": f"{__name__}:TinyBenchmark",
                              "episodes_per_task": 1, "params": {"length": 6, "seed": 0}}]}
    results = evaluate(server, config, docker=False, no_save=True)
    assert len(results) == 1 and results[0].get("num_errors", 0) == 0, results
    return dict(TinyBenchmark.received)


@pytest.mark.parametrize("options", [{}, {"replan": 3, "max_batch_size": 2}],
                         ids=["whole-chunk", "replan-3-batched"])
def test_vla_evals_orchestrator_executes_the_bundles_chunks(bundle, options, caplog):
    server = VlaEvalServer(bundle, cameras=CAMERAS, **options)
    with caplog.at_level("INFO"):
        received = _run(server)
    assert "Spec validation passed" in caplog.text
    assert sorted(received) == sorted((task, 0) for task in TASKS)
    for (task, episode), actions in received.items():
        assert len(actions) == 6 and all(a.shape == (3,) for a in actions)
        np.testing.assert_allclose(np.stack(actions),
                                   _expected(server, bundle, TASKS.index(task), episode, 6),
                                   atol=1e-5)
    if not options:  # the same run again gives the same actions
        again = _run(server)
        for key, actions in received.items():
            np.testing.assert_array_equal(np.stack(again[key]), np.stack(actions))


def test_calvins_episode_restart_drops_the_rest_of_the_chunk(bundle):
    server = VlaEvalServer(bundle, cameras=CAMERAS, warm_up=False)
    ctx = SessionContext(session_id="s", episode_id="e")
    sent = []

    async def send(action):
        sent.append(action["actions"])

    ctx._send_action_fn = send

    async def episode():
        await server.on_episode_start({"task": {"name": TASKS[0], "episode_idx": 0}}, ctx)
        for step in range(3):
            obs = observation_at(0, 0, step)
            if step == 2:
                obs["episode_restart"] = True
            await server.on_observation(obs, ctx)
            ctx._increment_step()

    anyio.run(episode)
    first = server.predict(observation_at(0, 0, 0), _ctx(server, TASKS[0], 0, 0))["actions"]
    replanned = server.predict(observation_at(0, 0, 2), _ctx(server, TASKS[0], 0, 2))["actions"]
    np.testing.assert_allclose(np.stack(sent), np.stack([first[0], first[1], replanned[0]]),
                               atol=1e-5)


def test_the_command_line_builds_the_server_it_is_asked_for(bundle, tmp_path, monkeypatch):
    import vla_eval.model_servers.serve as vla_eval_serve

    bundle.save(tmp_path / "policy")
    served = {}
    monkeypatch.setattr(vla_eval_serve, "serve",
                        lambda server, host, port: served.update(server=server, host=host,
                                                                 port=port))
    assert main([str(tmp_path / "policy"), "--port", "8765", "--device", "cpu",
                 "--camera", "agentview", "--camera", "wrist", "--replan", "2",
                 "--seed", "5", "--state-key", "states"]) == 0
    server = served["server"]
    assert (served["host"], served["port"]) == ("127.0.0.1", 8765)
    assert server.cameras == CAMERAS and server.replan == 2 and server.seed == 5
    ctx = _ctx(server, TASKS[0], 0, 0)
    np.testing.assert_allclose(server.predict(_obs(), ctx)["actions"],
                               _alone(bundle, _obs(), server.seed_for(ctx)), atol=1e-5)
    with pytest.raises(SystemExit, match="not a mix"):
        main([str(tmp_path / "policy"), "--camera", "agentview", "--camera",
              "wrist=observation/wrist_image"])
