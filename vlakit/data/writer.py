"""Writing LeRobot v3 dataset folders: demonstrations recorded in a simulator or on a
robot, episode by episode, into the layout [LeRobotDataset][vlakit.data.LeRobotDataset]
(and LeRobot's own reader) reads.

One data parquet file and one mp4 per camera hold every episode (``chunk-000/file-000``),
as LeRobot v3 packs episodes; ``meta/episodes`` says where each episode's rows and frames
are, ``meta/tasks.parquet`` numbers the instructions, ``meta/stats.json`` holds the
statistics of every numeric feature (``mean``, ``std``, ``min``, ``max``, ``q01``, ``q99``)
and ``meta/info.json`` the features, the fps and the path templates.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlakit.data._stats import feature_statistics
from vlakit.data.lerobot import DatasetError

__all__ = ["LeRobotWriter"]

_DATA_FILE = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
_VIDEO_FILE = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
# LeRobot's own columns of every frame, beside the features one records
_INDEX_FEATURES = {name: {"dtype": dtype, "shape": [1], "names": None} for name, dtype in (
    ("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
    ("index", "int64"), ("task_index", "int64"))}
_CODEC_NAMES = {"libsvtav1": "av1", "libaom-av1": "av1", "libx264": "h264",
                "libx265": "hevc", "mpeg4": "mpeg4", "libvpx-vp9": "vp9"}


class LeRobotWriter:
    """Write episodes into a new LeRobot v3 folder.

    ``features`` names what each frame records, as LeRobot's ``info.json`` does: a camera
    is ``{"dtype": "video", "shape": [h, w, 3]}``, a vector ``{"dtype": "float32",
    "shape": [n]}`` (``observation.state``, ``action``, ...). Every episode gives every
    feature, ``T`` frames of each: images ``[T, h, w, 3]`` uint8, vectors ``[T, n]``.

    Videos are encoded with PyAV (the ``data`` extra); the default, ``libsvtav1`` with
    ``crf`` 30 and a key frame every 2 frames, is what LeRobot records with; for small
    images a lower ``crf`` keeps more detail (``video_options={"crf": "10"}``).

    Example::

        with LeRobotWriter("demos", fps=10, features={
                "observation.images.top": {"dtype": "video", "shape": [64, 64, 3]},
                "observation.state": {"dtype": "float32", "shape": [39]},
                "action": {"dtype": "float32", "shape": [4]}}) as writer:
            writer.add_episode({"observation.images.top": images, "observation.state": state,
                                "action": actions}, task="open the drawer")

    Args:
        root: the folder to create (it must not exist, or be empty).
        fps: frames per second of the recording (the frame timestamps are ``t / fps``).
        features: feature name -> ``{"dtype", "shape"}`` (and optional ``"names"``).
        robot_type: written into ``info.json``.
        video_codec: the PyAV encoder of every camera.
        video_options: the encoder's options (default: LeRobot's ``crf`` 30, ``g`` 2).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fps: int,
        features: Mapping[str, Mapping[str, Any]],
        robot_type: str | None = None,
        video_codec: str = "libsvtav1",
        video_options: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            raise DatasetError(f"{self.root} exists and is not empty; the writer makes a new "
                               f"dataset folder: give a new path or remove it")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        clash = sorted(set(features) & set(_INDEX_FEATURES))
        if clash:
            raise DatasetError(f"feature {clash[0]!r} is a column LeRobot writes itself; "
                               f"name yours differently")
        self.fps, self.robot_type = fps, robot_type
        self.features = {k: dict(v) for k, v in features.items()}
        for key, feature in self.features.items():
            if feature.get("dtype") not in ("video", "float32", "float64", "int64", "bool"):
                raise DatasetError(f"feature {key!r}: dtype {feature.get('dtype')!r}; the "
                                   f"writer records 'video', 'float32', 'float64', 'int64' "
                                   f"and 'bool' features")
            shape = feature.get("shape")
            if feature["dtype"] == "video" and (len(shape or ()) != 3 or shape[2] != 3):
                raise DatasetError(f"camera {key!r}: shape {shape}; a video feature is "
                                   f"[height, width, 3]")
            if feature["dtype"] == "video" and (shape[0] % 2 or shape[1] % 2):
                raise DatasetError(f"camera {key!r}: {shape[0]}x{shape[1]}; the videos are "
                                   f"yuv420p, which needs an even height and width: crop or "
                                   f"pad the images by a pixel")
            if feature["dtype"] != "video" and len(shape or ()) != 1:
                raise DatasetError(f"feature {key!r}: shape {shape}; a vector feature is "
                                   f"[n]")
        self.cameras = [k for k, f in self.features.items() if f["dtype"] == "video"]
        self.vectors = [k for k in self.features if k not in self.cameras]
        self.video_codec = video_codec
        self.video_options = dict({"crf": "30", "g": "2"} if video_options is None
                                  else video_options)
        self._rows: list[dict] = []
        self._episodes: list[dict] = []
        self._tasks: dict[str, int] = {}
        self._videos: dict[str, Any] = {}
        self._closed = False
        self._broken: str | None = None
        self._pixels = {key: [] for key in self.cameras}  # frames sampled for the statistics
        self.root.mkdir(parents=True, exist_ok=True)

    # -- recording -----------------------------------------------------------------------

    def add_episode(self, frames: Mapping[str, Any], task: str) -> int:
        """Append one episode: ``frames`` holds every feature (``[T, ...]`` arrays or
        tensors of the same ``T``), ``task`` is its instruction. Returns the episode's
        index. A missing or unknown feature, a wrong shape or an empty episode raises
        before anything of the episode is written."""
        if self._closed:
            raise DatasetError("the writer is closed; make a new one for more episodes")
        if self._broken:
            raise DatasetError(f"the writer cannot go on: {self._broken}")
        missing = [k for k in self.features if k not in frames]
        unknown = [k for k in frames if k not in self.features]
        if missing or unknown:
            raise DatasetError(f"episode {len(self._episodes)}: "
                               + (f"feature {missing[0]!r} is missing" if missing else
                                  f"feature {unknown[0]!r} is not one of the writer's "
                                  f"features {sorted(self.features)}"))
        arrays = {k: np.asarray(v.cpu() if hasattr(v, "cpu") else v) for k, v in frames.items()}
        lengths = {k: len(a) for k, a in arrays.items()}
        length = lengths[next(iter(lengths))]
        if length == 0 or len(set(lengths.values())) != 1:
            raise DatasetError(f"episode {len(self._episodes)}: every feature needs the same, "
                               f"non-zero number of frames, got {lengths}")
        for key, array in arrays.items():
            want = tuple(self.features[key]["shape"])
            if tuple(array.shape[1:]) != want:
                raise DatasetError(f"episode {len(self._episodes)}: feature {key!r} has "
                                   f"frames of shape {tuple(array.shape[1:])}, the writer's "
                                   f"features say {want}")
            if key in self.cameras and array.dtype != np.uint8:
                raise DatasetError(f"episode {len(self._episodes)}: camera {key!r} is "
                                   f"{array.dtype}; give uint8 [T, h, w, 3] frames")
        if not isinstance(task, str) or not task:
            raise DatasetError(f"episode {len(self._episodes)}: task must be a non-empty "
                               f"string (the instruction), got {task!r}")
        episode_index = len(self._episodes)
        start = len(self._rows)
        try:  # the videos first: an encoder error leaves no rows behind
            for key in self.cameras:
                self._encode(key, arrays[key])
        except Exception as error:
            # a camera's video may hold part of the episode now: the next episode's frames
            # would not be where meta/episodes says, so nothing more is written
            self._broken = f"encoding episode {episode_index} failed ({error})"
            raise
        task_index = self._tasks.setdefault(task, len(self._tasks))
        for t in range(length):
            # LeRobot's timestamp counts from the episode's start; the video's offset of
            # the episode is in meta/episodes (from_timestamp)
            row = {"timestamp": t / self.fps, "frame_index": t, "episode_index": episode_index,
                   "index": start + t, "task_index": task_index}
            for key in self.vectors:  # a [1] feature is a scalar column, as LeRobot's
                value = arrays[key][t].tolist()
                row[key] = value[0] if self.features[key]["shape"] == [1] else value
            self._rows.append(row)
        episode = {"episode_index": episode_index, "tasks": [task], "length": length,
                   "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                   "data/chunk_index": 0, "data/file_index": 0,
                   "dataset_from_index": start, "dataset_to_index": start + length}
        for key in self.cameras:
            episode |= {f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                        f"videos/{key}/from_timestamp": start / self.fps,
                        f"videos/{key}/to_timestamp": (start + length) / self.fps}
            self._pixels[key].append(arrays[key][::10])  # every 10th frame: image stats
        self._episodes.append(episode)
        return episode_index

    def _encode(self, camera: str, images: np.ndarray) -> None:
        import av

        if camera not in self._videos:
            path = self.root / _VIDEO_FILE.format(video_key=camera, chunk_index=0,
                                                  file_index=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(path), "w")
            stream = container.add_stream(self.video_codec, rate=self.fps)
            stream.height, stream.width = self.features[camera]["shape"][:2]
            stream.pix_fmt = "yuv420p"
            stream.options = self.video_options
            self._videos[camera] = (container, stream)
        container, stream = self._videos[camera]
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)

    # -- finishing -----------------------------------------------------------------------

    def close(self) -> Path:
        """Flush the videos and write the data and meta files; returns the folder. An
        empty writer (no episode) raises: a dataset has at least one episode."""
        if self._closed:
            return self.root
        if not self._episodes:
            raise DatasetError(f"{self.root}: no episode was added; nothing to write")
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._closed = True
        for container, stream in self._videos.values():
            for packet in stream.encode():
                container.mux(packet)
            container.close()
        data = self.root / _DATA_FILE.format(chunk_index=0, file_index=0)
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self._rows, schema=self._schema(pa)), data)
        meta = self.root / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self._episodes),
                       meta / "episodes" / "chunk-000" / "file-000.parquet")
        pq.write_table(self._task_table(pa), meta / "tasks.parquet")
        (meta / "stats.json").write_text(json.dumps(self._statistics(), indent=2))
        (meta / "info.json").write_text(json.dumps(self._info(), indent=2))
        return self.root

    def _task_table(self, pa):
        """``meta/tasks.parquet`` as LeRobot writes it with pandas: a ``task_index`` column
        indexed by the task string (pandas' metadata names ``task`` the index, so
        ``pd.read_parquet(...).iloc[i].name`` is the instruction, as LeRobot reads it)."""
        tasks = sorted(self._tasks.items(), key=lambda kv: kv[1])
        table = pa.table({"task_index": pa.array([i for _, i in tasks], pa.int64()),
                          "task": pa.array([t for t, _ in tasks], pa.string())})
        columns = [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                    "numpy_type": "int64", "metadata": None},
                   {"name": "task", "field_name": "task", "pandas_type": "unicode",
                    "numpy_type": "object", "metadata": None}]
        pandas = {"index_columns": ["task"], "column_indexes": [], "columns": columns,
                  "creator": {"library": "pyarrow", "version": pa.__version__},
                  "pandas_version": "2.2.3"}
        return table.replace_schema_metadata({b"pandas": json.dumps(pandas).encode()})

    def _schema(self, pa):
        """The data file's columns with the features' dtypes (``float32`` lists, not the
        ``double`` pyarrow would infer), as LeRobot writes them."""
        types = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(),
                 "bool": pa.bool_()}
        fields = [pa.field("timestamp", pa.float32()), pa.field("frame_index", pa.int64()),
                  pa.field("episode_index", pa.int64()), pa.field("index", pa.int64()),
                  pa.field("task_index", pa.int64())]
        fields += [pa.field(key, types[self.features[key]["dtype"]]
                            if self.features[key]["shape"] == [1] else
                            pa.list_(types[self.features[key]["dtype"]]))
                   for key in self.vectors]
        return pa.schema(fields)

    def _statistics(self) -> dict:
        stats = {}
        for key in self.cameras:
            # LeRobot's image statistics: per channel, in [0, 1], shaped [3, 1, 1]; from
            # every 10th frame of each episode
            x = np.concatenate(self._pixels[key]).reshape(-1, 3).astype(np.float64) / 255.0
            stats[key] = {name: np.asarray(value).reshape(3, 1, 1).tolist()
                          for name, value in feature_statistics(x).items()}
            stats[key]["count"] = [len(self._rows)]
        for key in self.vectors:
            x = np.asarray([row[key] for row in self._rows], dtype=np.float64)
            stats[key] = {**feature_statistics(x), "count": [len(x)]}
        return stats

    def _info(self) -> dict:
        features = {}
        for key, feature in self.features.items():
            entry = {"dtype": feature["dtype"], "shape": list(feature["shape"]),
                     "names": feature.get("names")}
            if key in self.cameras:
                h, w, c = feature["shape"]
                entry["names"] = feature.get("names") or ["height", "width", "channels"]
                entry["info"] = {"video.height": h, "video.width": w,
                                 "video.codec": _CODEC_NAMES.get(self.video_codec,
                                                                 self.video_codec),
                                 "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                                 "video.fps": self.fps, "video.channels": c,
                                 "has_audio": False}
            features[key] = entry
        features |= _INDEX_FEATURES
        return {"codebase_version": "v3.0", "robot_type": self.robot_type,
                "total_episodes": len(self._episodes), "total_frames": len(self._rows),
                "total_tasks": len(self._tasks), "chunks_size": 1000,
                "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
                "fps": self.fps, "splits": {"train": f"0:{len(self._episodes)}"},
                "data_path": _DATA_FILE, "video_path": _VIDEO_FILE if self.cameras else None,
                "features": features}

    def __enter__(self) -> "LeRobotWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:  # an error mid-recording: release the encoders, write no meta files
            self._closed = True
            for container, _ in self._videos.values():
                container.close()
