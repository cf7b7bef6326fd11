"""Robot-learning datasets: LeRobot v3 folders read from disk, an in-memory dataset for
tests, and a collate that turns samples into a model batch through a processor.

A LeRobot v3 folder (needs the ``data`` extra: ``pip install 'vlakit-blocks[data]'`` for
pyarrow and PyAV)::

    meta/info.json                       fps, features, data_path / video_path templates
    meta/episodes/chunk-000/file-000.parquet   one row per episode (frames, files, tasks)
    meta/tasks.parquet                   task_index -> task (the instruction)
    meta/stats.json                      per-feature statistics (optional)
    data/chunk-000/file-000.parquet      one row per frame (state, action, indices)
    videos/<camera>/chunk-000/file-000.mp4   every episode of a camera, concatenated

A chunk that runs past its episode's end repeats the last action and marks those steps in
the sample's ``action_is_pad`` (LeRobot's mask), which the losses leave out. The
documentation's "LeRobot datasets" page lists every file and column the reader uses.
"""

import bisect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlakit.data._stats import feature_statistics

__all__ = ["LeRobotDataset", "InMemoryDataset", "collate_with", "DatasetError"]


class DatasetError(ValueError):
    """A dataset folder that cannot be read as promised (named file, episode or camera)."""


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


class LeRobotDataset(Dataset):
    """A LeRobot v3 dataset folder, one sample per frame.

    A sample is a dict: ``images`` ``[views, 3, h, w]`` uint8 (one per camera, in
    ``cameras`` order), ``instruction`` (the frame's task), ``proprio`` ``[p]`` (the state
    feature), ``actions`` ``[chunk, a]`` (this frame's action and the next ``chunk - 1`` of
    the same episode; past the episode's end the episode's last action repeats, as LeRobot
    pads), ``action_is_pad`` ``[chunk]`` bool (``True`` for those repeated steps: step
    ``k`` of a chunk that starts at frame ``t`` of an ``n``-frame episode is padding when
    ``t + k >= n``, LeRobot's ``action_is_pad``), and ``episode``, ``frame``.
    [collate_with][vlakit.data.collate_with] hands the mask to the processor, and every
    action head's loss leaves the padded steps out.

    Everything the folder promises is checked when the dataset is made, before any sample
    is read: every episode's data file and every camera's video file exist, each camera
    named in ``info.json`` has frames, the state and action features are there.

    Args:
        root: the dataset folder.
        chunk_size: actions per sample.
        cameras: which image/video features to read (default: all, in ``info.json``'s order).
        state_key: the proprio feature.
        action_key: the action feature.
        preload: decode every camera's video once, when the dataset is made, and keep the
            frames in memory (``frames x h x w x 3`` bytes per camera), instead of opening
            and seeking a video for each sample: for small datasets trained on for many
            epochs (the same frames either way).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        chunk_size: int = 1,
        cameras: Sequence[str] | None = None,
        state_key: str = "observation.state",
        action_key: str = "action",
        preload: bool = False,
    ) -> None:
        self.root = Path(root)
        info_file = self.root / "meta" / "info.json"
        if not info_file.is_file():
            raise DatasetError(f"{self.root} has no meta/info.json: not a LeRobot v3 dataset")
        self.info = json.loads(info_file.read_text())
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise DatasetError(f"{info_file}: codebase_version {version!r}; this reader "
                               f"reads LeRobot v3 folders")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size, self.fps = chunk_size, float(self.info["fps"])
        features = self.info["features"]
        visual = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
        self.cameras = list(visual if cameras is None else cameras)
        unknown = [c for c in self.cameras if c not in visual]
        if unknown:
            raise DatasetError(f"camera {unknown[0]!r} is not an image or video feature of "
                               f"{info_file} (cameras: {visual})")
        stills = [c for c in self.cameras if features[c].get("dtype") == "image"]
        if stills:
            raise DatasetError(
                f"camera {stills[0]!r} is an image feature (frames stored in the data parquet "
                f"files), which this reader does not decode: it reads video features (one mp4 "
                f"per camera); leave it out with cameras="
                f"{[c for c in self.cameras if c not in stills]}")
        for key in (state_key, action_key):
            if key not in features:
                raise DatasetError(f"{info_file} has no feature {key!r} "
                                   f"(features: {sorted(features)})")
        self.state_key, self.action_key = state_key, action_key
        self.action_dim = int(features[action_key]["shape"][0])
        self.state_dim = int(features[state_key]["shape"][0])
        self.episodes = self._episodes()
        self.tasks = self._tasks()
        self._check_files()
        self._index = [(e, t) for e, ep in enumerate(self.episodes) for t in range(ep["length"])]
        self._tables: dict[Path, Any] = {}
        self._decoded: dict[Path, tuple[list[float], Tensor]] = {}
        if preload:
            for episode in self.episodes:
                for camera in self.cameras:
                    self._decode_all(self._video_file(episode, camera))

    # -- metadata ------------------------------------------------------------------------

    def _episodes(self) -> list[dict]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(f"{self.root} has no meta/episodes/chunk-*/file-*.parquet")
        rows = []
        for file in files:
            rows += _read_parquet(file).to_pylist()
        return sorted(rows, key=lambda r: r["episode_index"])

    def _tasks(self) -> dict[int, str]:
        file = self.root / "meta" / "tasks.parquet"
        if not file.is_file():
            raise DatasetError(f"{self.root} has no meta/tasks.parquet")
        table = _read_parquet(file).to_pydict()
        names = table.get("task") or table.get("__index_level_0__")
        return dict(zip(table["task_index"], names))

    def _data_file(self, episode: dict) -> Path:
        return self.root / self.info["data_path"].format(
            chunk_index=episode["data/chunk_index"], file_index=episode["data/file_index"])

    def _video_file(self, episode: dict, camera: str) -> Path:
        return self.root / self.info["video_path"].format(
            video_key=camera, chunk_index=episode[f"videos/{camera}/chunk_index"],
            file_index=episode[f"videos/{camera}/file_index"])

    def _check_files(self) -> None:
        for episode in self.episodes:
            file = self._data_file(episode)
            if not file.is_file():
                raise DatasetError(f"episode {episode['episode_index']}'s data file {file} "
                                   f"is missing")
            for camera in self.cameras:
                if f"videos/{camera}/chunk_index" not in episode:
                    raise DatasetError(f"camera {camera!r} has no frames for episode "
                                       f"{episode['episode_index']} in meta/episodes")
                video = self._video_file(episode, camera)
                if not video.is_file():
                    raise DatasetError(f"camera {camera!r} has no frames: {video} is missing "
                                       f"(episode {episode['episode_index']})")

    def statistics(self) -> dict:
        """OpenVLA-style statistics ``{"dataset": {"action": {...}, "proprio": {...}}}``
        (``mean``, ``std``, ``min``, ``max``, ``q01``, ``q99``): from ``meta/stats.json``
        when it has them, else computed from the data files. Feed
        ``ActionNormalizer.from_stats(stats, mode=...)``."""
        file = self.root / "meta" / "stats.json"
        stored = json.loads(file.read_text()) if file.is_file() else {}
        out = {}
        for name, key in (("action", self.action_key), ("proprio", self.state_key)):
            values = stored.get(key)
            if not values or not {"q01", "q99"} <= set(values):
                values = self._compute_stats(key)
            out[name] = {k: list(map(float, v)) for k, v in values.items()
                         if k in ("mean", "std", "min", "max", "q01", "q99")}
        return {self.root.name: out}

    def _compute_stats(self, key: str) -> dict:
        column = []
        for episode in self.episodes:
            table = self._table(self._data_file(episode))
            rows = range(episode["dataset_from_index"], episode["dataset_to_index"])
            column.append(self._rows(table, key, rows))
        return feature_statistics(torch.cat(column).numpy())  # float64 inside

    # -- samples -------------------------------------------------------------------------

    def _table(self, file: Path):
        if file not in self._tables:
            table = _read_parquet(file)
            index = table.column("index").to_pylist()
            self._tables[file] = (table, {g: i for i, g in enumerate(index)})
        return self._tables[file]

    @staticmethod
    def _rows(table, key: str, rows) -> Tensor:
        data, where = table
        column = data.column(key)
        values = torch.tensor([column[where[r]].as_py() for r in rows], dtype=torch.float32)
        return values[:, None] if values.dim() == 1 else values  # a scalar column: [n, 1]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        e, t = self._index[i]
        episode = self.episodes[e]
        table = self._table(self._data_file(episode))
        start, end = episode["dataset_from_index"], episode["dataset_to_index"]
        frame = start + t
        steps = [min(frame + k, end - 1) for k in range(self.chunk_size)]
        # LeRobot's action_is_pad: True where the chunk ran past the episode's last frame
        is_pad = torch.tensor([frame + k >= end for k in range(self.chunk_size)])
        data, where = table
        task_index = data.column("task_index")[where[frame]].as_py()
        images = [self._frame(episode, camera, t) for camera in self.cameras]
        return {
            "images": torch.stack(images) if images else torch.empty(0),
            "instruction": self.tasks[task_index],
            "proprio": self._rows(table, self.state_key, [frame])[0],
            "actions": self._rows(table, self.action_key, steps),
            "action_is_pad": is_pad,
            "episode": episode["episode_index"],
            "frame": t,
        }

    def _decode_all(self, path: Path) -> None:
        """Decode every frame of one video file into memory (``preload``)."""
        import av

        if path in self._decoded:
            return
        times, frames = [], []
        with av.open(str(path)) as container:
            for frame in container.decode(container.streams.video[0]):
                if frame.time is not None:
                    times.append(float(frame.time))
                    frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
        if not frames:
            raise DatasetError(f"{path} has no decodable frames")
        self._decoded[path] = (times, torch.stack(frames).permute(0, 3, 1, 2).contiguous())

    def _frame(self, episode: dict, camera: str, t: int) -> Tensor:
        """Frame ``t`` of ``episode`` from its camera's video: the first decoded frame at or
        after ``from_timestamp + t / fps``, ``[3, h, w]`` uint8."""
        import av

        target = float(episode.get(f"videos/{camera}/from_timestamp", 0.0)) + t / self.fps
        path = self._video_file(episode, camera)
        if path in self._decoded:
            times, frames = self._decoded[path]
            i = bisect.bisect_left(times, target - 0.5 / self.fps)
            if i < len(times) and times[i] <= target + 0.5 / self.fps:
                return frames[i]
            raise DatasetError(f"camera {camera!r} has no frame at {target:.3f} s in {path} "
                               f"(within half a frame)")
        with av.open(str(self._video_file(episode, camera))) as container:
            stream = container.streams.video[0]
            container.seek(max(0, int((target - 1.0) / stream.time_base)), stream=stream,
                           backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time + 0.5 / self.fps >= target:
                    if frame.time > target + 0.5 / self.fps:  # a gap: not this frame's
                        break
                    array = frame.to_ndarray(format="rgb24")  # [h, w, 3]
                    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
        raise DatasetError(f"camera {camera!r} has no frame at {target:.3f} s in "
                           f"{self._video_file(episode, camera)}")

    def check_model(self, model) -> None:
        """Raise a ``ValueError`` if ``model`` cannot train on this dataset's samples: its
        action head predicts another action width or another chunk size (any
        [ActionHead][vlakit.heads.ActionHead]: they all state ``action_dim`` and
        ``chunk_size``), or its proprio projector takes another state width (naming both
        numbers and what to change). A head that predicts no actions (``NextTokenHead``) is
        not checked, nor a proprio projector that states no ``in_dim``."""
        from vlakit.heads import ActionHead

        head = model.head
        if isinstance(head, ActionHead):
            if head.action_dim != self.action_dim:
                raise ValueError(
                    f"the dataset's actions have {self.action_dim} dimensions but the "
                    f"model's head predicts {head.action_dim}; build the head with "
                    f"action_dim={self.action_dim}, or read another action feature "
                    f"(action_key)")
            if head.chunk_size != self.chunk_size:
                raise ValueError(
                    f"the dataset yields chunks of {self.chunk_size} actions (chunk_size="
                    f"{self.chunk_size}) but the model's head predicts chunks of "
                    f"{head.chunk_size}; make the dataset with chunk_size={head.chunk_size} "
                    f"or build the head with chunk_size={self.chunk_size}")
        # vlakit's projectors state in_dim; a projector of your own may not (then unchecked)
        width = getattr(model.proprio_projector, "in_dim", None)
        if width is not None and width != self.state_dim:
            raise ValueError(f"the dataset's state has {self.state_dim} dimensions but the "
                             f"model's proprio projector takes {width}")


class InMemoryDataset(Dataset):
    """Samples held in a list (the same dicts ``LeRobotDataset`` yields): for tests and
    small synthetic tasks."""

    def __init__(self, samples: Sequence[dict]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def collate_with(processor: Callable) -> Callable[[list[dict]], Any]:
    """A ``DataLoader`` collate that stacks samples and runs them through ``processor``
    (an [OpenVLAProcessor][vlakit.processors.OpenVLAProcessor], say): images
    ``[b, views, 3, h, w]``, instructions, actions ``[b, chunk, a]``, proprio ``[b, p]``
    and, when the samples carry it (``LeRobotDataset``'s do), the pad mask
    ``action_is_pad`` ``[b, chunk]`` -> a padded model batch. Samples without
    ``action_is_pad`` (an ``InMemoryDataset`` of your own) pass no mask: every step is a
    target. A batch in which some samples carry the mask and others do not raises."""

    def collate(samples: list[dict]):
        images = torch.stack([s["images"] for s in samples])
        masked = ["action_is_pad" in s for s in samples]
        extra = {}
        if any(masked):
            if not all(masked):
                raise ValueError(
                    f"sample {masked.index(False)} of the batch has no 'action_is_pad' but "
                    f"sample {masked.index(True)} has one: give every sample the mask "
                    f"(bool [chunk], True where the step is padding) or none")
            extra["action_is_pad"] = torch.stack(
                [torch.as_tensor(s["action_is_pad"], dtype=torch.bool) for s in samples])
        return processor(images, [s["instruction"] for s in samples],
                         actions=torch.stack([s["actions"] for s in samples]),
                         proprio=torch.stack([s["proprio"] for s in samples]), **extra)

    return collate
