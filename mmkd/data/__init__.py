"""Datasets: importing this package registers every built-in dataset in `DATASETS`."""

from omegaconf import DictConfig, OmegaConf

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
    """The splits of the dataset `cfg.name` (`cfg` is the `data` config node). The builder is
    given typed values: the node as its schema's dataclass (`DataCfg` with the dataset's
    section(s) as their `Config` instances), interpolations resolved."""
    data = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
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
]
