"""LeRobotWriter: episodes written as a LeRobot v3 folder read back by LeRobotDataset
(frames, vectors, tasks, chunks across episode ends, statistics), ``preload`` giving the
same samples, and the recording mistakes that must raise."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("pyarrow")

from vlakit.data import DatasetError, LeRobotDataset, LeRobotWriter  # noqa: E402

FEATURES = {"observation.images.top": {"dtype": "video", "shape": [32, 48, 3]},
            "observation.state": {"dtype": "float32", "shape": [3]},
            "action": {"dtype": "float32", "shape": [2]}}
LENGTHS = (6, 4, 5)
TASKS = ("open the drawer", "push the puck", "open the drawer")


def _episode(e: int, n: int) -> dict:
    # flat frames whose shade encodes (episode, frame), so a wrong frame shows
    shade = np.array([20 + 40 * e + 6 * t for t in range(n)], dtype=np.uint8)
    images = np.broadcast_to(shade[:, None, None, None], (n, 32, 48, 3)).copy()
    state = np.stack([np.full(3, e + 0.25 * t, dtype=np.float32) for t in range(n)])
    action = np.stack([np.array([10.0 * e + t, -t], dtype=np.float32) for t in range(n)])
    return {"observation.images.top": images, "observation.state": state, "action": action}


def _write(root, **kwargs):
    with LeRobotWriter(root, fps=10, features=FEATURES, **kwargs) as writer:
        for e, (n, task) in enumerate(zip(LENGTHS, TASKS)):
            assert writer.add_episode(_episode(e, n), task=task) == e
    return root


@pytest.mark.parametrize("codec", ["libsvtav1", "mpeg4"])
def test_written_episodes_read_back(tmp_path, codec):
    options = {"crf": "10", "g": "2"} if codec == "libsvtav1" else {"qscale": "1"}
    root = _write(tmp_path / "demos", video_codec=codec, video_options=options)
    data = LeRobotDataset(root, chunk_size=3)
    assert len(data) == sum(LENGTHS) and data.cameras == ["observation.images.top"]
    assert data.state_dim == 3 and data.action_dim == 2
    i = 0
    for e, n in enumerate(LENGTHS):
        for t in range(n):
            sample = data[i]
            i += 1
            assert sample["episode"] == e and sample["frame"] == t
            assert sample["instruction"] == TASKS[e]
            assert sample["images"].shape == (1, 3, 32, 48)
            assert abs(float(sample["images"].float().mean()) - (20 + 40 * e + 6 * t)) < 3
            assert torch.equal(sample["proprio"], torch.full((3,), e + 0.25 * t))
            steps = [min(t + k, n - 1) for k in range(3)]
            assert sample["actions"].tolist() == [[10.0 * e + s, -s] for s in steps]
            assert sample["action_is_pad"].tolist() == [t + k >= n for k in range(3)]
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 3 and info["total_frames"] == sum(LENGTHS)
    assert info["total_tasks"] == 2  # the repeated instruction is one task
    assert {"index", "episode_index", "frame_index", "timestamp", "task_index"} <= set(
        info["features"])


def test_statistics_are_the_recorded_ones(tmp_path):
    root = _write(tmp_path / "demos", video_options={"crf": "30", "g": "2"})
    stats = LeRobotDataset(root).statistics()["demos"]
    actions = np.concatenate([_episode(e, n)["action"] for e, n in enumerate(LENGTHS)])
    assert np.allclose(stats["action"]["mean"], actions.mean(0))
    assert np.allclose(stats["action"]["max"], actions.max(0))
    assert np.allclose(stats["action"]["q01"], np.quantile(actions, 0.01, axis=0))
    stored = json.loads((root / "meta" / "stats.json").read_text())
    assert stored["observation.state"]["count"] == [sum(LENGTHS)]


def test_preload_gives_the_same_samples(tmp_path):
    root = _write(tmp_path / "demos")
    lazy, held = LeRobotDataset(root, chunk_size=2), LeRobotDataset(root, chunk_size=2,
                                                                     preload=True)
    for i in range(len(lazy)):
        a, b = lazy[i], held[i]
        assert torch.equal(a["images"], b["images"]), i
        assert torch.equal(a["actions"], b["actions"])


def test_recording_mistakes_raise(tmp_path):
    writer = LeRobotWriter(tmp_path / "a", fps=10, features=FEATURES)
    episode = _episode(0, 4)
    with pytest.raises(DatasetError, match="'action' is missing"):
        writer.add_episode({k: v for k, v in episode.items() if k != "action"}, task="x")
    with pytest.raises(DatasetError, match="'reward' is not one of"):
        writer.add_episode(episode | {"reward": np.zeros((4, 1))}, task="x")
    with pytest.raises(DatasetError, match=r"'observation.state' has frames of shape \(4,\)"):
        writer.add_episode(episode | {"observation.state": np.zeros((4, 4))}, task="x")
    with pytest.raises(DatasetError, match="same, non-zero number of frames"):
        writer.add_episode(episode | {"action": np.zeros((3, 2))}, task="x")
    with pytest.raises(DatasetError, match="is float64; give uint8"):
        images = episode["observation.images.top"].astype(np.float64)
        writer.add_episode(episode | {"observation.images.top": images}, task="x")
    with pytest.raises(DatasetError, match="task must be a non-empty string"):
        writer.add_episode(episode, task="")
    with pytest.raises(DatasetError, match="no episode was added"):
        writer.close()
    _write(tmp_path / "b")
    with pytest.raises(DatasetError, match="exists and is not empty"):
        LeRobotWriter(tmp_path / "b", fps=10, features=FEATURES)
    with pytest.raises(DatasetError, match="'index' is a column LeRobot writes"):
        LeRobotWriter(tmp_path / "c", fps=10, features=FEATURES | {"index": FEATURES["action"]})
    with pytest.raises(DatasetError, match=r"\[height, width, 3\]"):
        LeRobotWriter(tmp_path / "d", fps=10,
                      features={"cam": {"dtype": "video", "shape": [32, 32]}})


def test_the_data_file_has_the_features_dtypes(tmp_path):
    import pyarrow.parquet as pq

    root = _write(tmp_path / "demos")
    schema = pq.read_schema(root / "data" / "chunk-000" / "file-000.parquet")
    kind = schema.field("observation.state").type
    assert kind.num_fields == 1 and str(kind.value_type) == "float"  # float32 values
    assert str(schema.field("timestamp").type) == "float"
    assert str(schema.field("index").type) == "int64"


def test_tasks_images_and_scalars_are_laid_out_as_lerobot_reads_them(tmp_path):
    import pyarrow.parquet as pq

    features = FEATURES | {"next.reward": {"dtype": "float32", "shape": [1]}}
    with LeRobotWriter(tmp_path / "demos", fps=10, features=features) as writer:
        for e, (n, task) in enumerate(zip(LENGTHS, TASKS)):
            writer.add_episode(_episode(e, n) | {"next.reward": np.full((n, 1), float(e))},
                               task=task)
    root = tmp_path / "demos"
    # LeRobot reads tasks.parquet with pandas: the task string is the index
    tasks = pq.read_table(root / "meta" / "tasks.parquet")
    pandas = json.loads(tasks.schema.metadata[b"pandas"])
    assert pandas["index_columns"] == ["task"]
    assert tasks.column("task").to_pylist() == ["open the drawer", "push the puck"]
    # a [1] feature is a scalar column (LeRobot's datasets.Value), read back as [n, 1]
    schema = pq.read_schema(root / "data" / "chunk-000" / "file-000.parquet")
    assert str(schema.field("next.reward").type) == "float"
    data = LeRobotDataset(root, state_key="next.reward")
    assert data.state_dim == 1 and data[sum(LENGTHS[:2])]["proprio"].tolist() == [2.0]
    # camera statistics per channel in [0, 1], shaped [3, 1, 1], as LeRobot's
    stats = json.loads((root / "meta" / "stats.json").read_text())["observation.images.top"]
    assert np.asarray(stats["mean"]).shape == (3, 1, 1)
    shades = np.concatenate([_episode(e, n)["observation.images.top"][::10, 0, 0, 0]
                             for e, n in enumerate(LENGTHS)]) / 255.0
    assert np.allclose(np.asarray(stats["mean"]).ravel(), shades.mean())


def test_a_failed_encode_stops_the_writer(tmp_path):
    writer = LeRobotWriter(tmp_path / "a", fps=10, features=FEATURES,
                           video_codec="no-such-encoder")
    with pytest.raises(Exception):
        writer.add_episode(_episode(0, 4), task="x")
    with pytest.raises(DatasetError, match="cannot go on: encoding episode 0 failed"):
        writer.add_episode(_episode(0, 4), task="x")
    with pytest.raises(DatasetError, match="even height and width"):
        LeRobotWriter(tmp_path / "b", fps=10,
                      features={"cam": {"dtype": "video", "shape": [33, 32, 3]}})
