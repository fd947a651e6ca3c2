"""Datasets: importing this package registers every built-in dataset in `DATASETS`."""

from omegaconf import DictConfig

from mmkd.data import av_digits, demo, folder, fsdd, manifest, mnist  # noqa: F401  (registration)
from mmkd.data.base import DATASETS, DatasetSplits


def build_splits(cfg: DictConfig) -> DatasetSplits:
    """The splits of the dataset `cfg.name` (`cfg` is the `data` config node)."""
    return DATASETS.get(cfg.name, key="data.name")(cfg)


__all__ = ["DATASETS", "DatasetSplits", "build_splits"]
