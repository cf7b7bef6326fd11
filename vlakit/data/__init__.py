"""Datasets: LeRobot v3 folders read from disk and written from recorded episodes,
in-memory samples, and a collate through a processor (needs the ``data`` extra for
pyarrow and PyAV)."""

from vlakit.data.lerobot import DatasetError, InMemoryDataset, LeRobotDataset, collate_with
from vlakit.data.writer import LeRobotWriter

__all__ = ["LeRobotDataset", "LeRobotWriter", "InMemoryDataset", "collate_with",
           "DatasetError"]
