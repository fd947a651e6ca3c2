"""Datasets: importing this package registers every built-in dataset in `DATASETS`."""

from omegaconf import DictConfig

from mmkd.data import (  # noqa: F401  (registration)
    av_digits,
    demo,
    folder,
    fsdd,
    hf,
    manifest,
    mnist,
    webdataset,
)
from mmkd.data.base import (
    DATASETS,
    DatasetEntry,
    DatasetSplits,
    dataset_entry,
    dataset_sections,
    register_dataset,
)


def build_splits(cfg: DictConfig) -> DatasetSplits:
    """The splits of the dataset `cfg.name` (`cfg` is the `data` config node)."""
    splits = dataset_entry(cfg.name).build(cfg)
    if cfg.get("frames") is not None and cfg.frames.window is not None:
        from mmkd.data.frames import frame_splits

        splits = frame_splits(splits, cfg)
    return splits


__all__ = [
    "DATASETS",
    "DatasetEntry",
    "DatasetSplits",
    "build_splits",
    "dataset_entry",
    "dataset_sections",
    "register_dataset",
]
