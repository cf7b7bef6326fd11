"""Datasets: LeRobot v3 folders from disk, in-memory samples, and a collate through a
processor (needs the ``data`` extra for pyarrow and PyAV)."""

from vlakit.data.lerobot import DatasetError, InMemoryDataset, LeRobotDataset, collate_with

__all__ = ["LeRobotDataset", "InMemoryDataset", "collate_with", "DatasetError"]
