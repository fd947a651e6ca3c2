"""Datasets: importing this package registers every built-in dataset in `DATASETS`."""

from typing import Any

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
    typed_data,
)
from mmkd.errors import settings_at


def build_splits(cfg: Any) -> DatasetSplits:
    """The splits of the dataset `cfg.name` (`cfg`: the `data` config node, or its dataclass).
    The builder is given typed values: `DataCfg` with the dataset's section(s) as their
    `Config` instances, interpolations resolved (`typed_data`). A builder reports a wrong
    setting as a `SettingError` of its field under `data` (`folder.train`); it is named here
    as the config key (`data.folder.train`)."""
    data = typed_data(cfg)
    with settings_at("data"):
        splits = dataset_entry(data.name).build(data)
        frames = getattr(data, "frames", None)
        if frames is not None and frames.window is not None:
            from mmkd.data.frames import frame_splits

            splits = frame_splits(splits, data)
    return splits


__all__ = [
    "DATASETS",
    "DatasetEntry",
    "DatasetSplits",
    "build_splits",
    "dataset_entry",
    "dataset_sections",
    "register_dataset",
    "typed_data",
]
