"""What every dataset provides, and the dataset registry.

A dataset item is a *raw sample*: a dict with
    "id":    str, unique within the dataset (file name, manifest row, generated index)
    "label": int class index, or None when the sample has none
    and one entry per modality it carries:
    "image": PIL.Image or uint8 array (H, W) / (H, W, 3)
    "audio": (waveform float array (samples,) or (samples, channels), sample_rate int)
    "text":  str
    "where": optional str naming the source (e.g. "train.jsonl row 7") for error messages
Decoding errors raise `DataError` naming the file or row. Under `data.on_error=skip` a dataset
returns `Skipped(id, reason)` instead, and the collate function drops and counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from mmkd.errors import ConfigError, DataError
from mmkd.registry import Registry
from mmkd.settings import Settings

RawSample = dict[str, Any]
MODALITIES = ("image", "audio", "text")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # a number per split, to seed per-split draws
HOLDOUT_SEED = 0  # validation held out of train is fixed: it does not move with run.seed


@dataclass(frozen=True)
class Skipped:
    """Stands in for a sample that could not be decoded when `data.on_error=skip`."""

    id: str
    reason: str


@dataclass
class DatasetSplits:
    """The splits a run uses, plus what the data knows about its classes."""

    train: Dataset
    val: Dataset
    test: Dataset
    modalities: tuple[str, ...]  # modalities every sample carries
    class_names: list[str] = field(default_factory=list)  # empty: no labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# the run's typed `data` settings: an instance of mmkd.config.schema.DataCfg (the common fields)
# holding the dataset's section(s) as instances of their `Config` (`typed_data` converts a
# config node of that schema)
DataSettings = Any
DatasetBuilder = Callable[[DataSettings], DatasetSplits]


def typed_data(data: Any) -> DataSettings:
    """The `data` settings as their schema's dataclass (interpolations resolved): a config
    node of the schema is converted, a dataclass instance returned as it is."""
    if isinstance(data, DictConfig):
        if not is_dataclass(OmegaConf.get_type(data)):
            raise TypeError(
                "data settings must be typed (a node merged onto "
                "OmegaConf.structured(mmkd.config.schema.data_schema(name))), not a plain mapping"
            )
        return OmegaConf.to_object(data)
    return data


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its builder, its section `data.<name>` (a `Settings` dataclass
    declaring its checks and path keys; None: no settings of its own) and the other datasets
    whose sections it reads too (av_digits pairs fsdd clips with mnist images)."""

    name: str
    build: DatasetBuilder
    config: type[Settings] | None = None
    reads: tuple[str, ...] = ()


DATASETS: Registry[DatasetEntry] = Registry("dataset", entry_point_group="mmkd.datasets")


def register_dataset(
    name: str, config: type[Settings] | None = None, *, reads: tuple[str, ...] = ()
) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator: register a builder `f(data_cfg) -> DatasetSplits` as dataset `name`, with
    its section dataclass `config` (the schema's `data.<name>`) and the other datasets whose
    sections it `reads`."""

    def decorator(build: DatasetBuilder) -> DatasetBuilder:
        DATASETS.register(name)(DatasetEntry(name, build, config, tuple(reads)))
        return build

    return decorator


def dataset_entry(name: str, key: str = "data.name") -> DatasetEntry:
    """The registered dataset `name` (ConfigError at `key` listing the valid names). An object
    registered directly (`DATASETS.register(name)(builder)`) is a dataset without settings."""
    entry = DATASETS.get(name, key=key)
    return entry if isinstance(entry, DatasetEntry) else DatasetEntry(name, entry)


def dataset_sections(name: str, key: str = "data.name") -> dict[str, type[Settings]]:
    """Section name -> dataclass of every `data.<section>` dataset `name` reads: its own
    first, then those of the datasets it `reads`."""
    entry = dataset_entry(name, key)
    sections = {entry.name: entry.config} if entry.config is not None else {}
    for other in entry.reads:
        sections.update(dataset_sections(other, f"{key} ({name} reads data.{other})"))
    return sections


class SafeDataset(Dataset):
    """Base for file-backed datasets: wraps `load(i)` so that failures name the sample and,
    under on_error=skip, become `Skipped` markers instead of exceptions."""

    def __init__(self, on_error: str = "raise") -> None:
        self.on_error = on_error

    def sample_id(self, index: int) -> str:
        return str(index)

    def load(self, index: int) -> RawSample:
        raise NotImplementedError

    def __getitem__(self, index: int) -> RawSample | Skipped:
        try:
            return self.load(index)
        except DataError as err:
            if self.on_error == "skip":
                return Skipped(self.sample_id(index), str(err))
            raise


def holdout_split(dataset: Dataset, size: float, seed: int) -> tuple[Subset, Subset]:
    """Deterministic (train, val) split of `dataset` holding out `size` samples for validation
    (a float below 1 is a fraction of the dataset)."""
    n = len(dataset)  # type: ignore[arg-type]
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * size) if isinstance(size, float) and size < 1 else int(size)
    if not 0 <= n_val < n:
        raise ConfigError(f"validation split of {size} leaves no train or no val samples (of {n})")
    return Subset(dataset, sorted(order[n_val:].tolist())), Subset(dataset, sorted(order[:n_val]))


def limit(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    """A deterministic random subset of at most `max_samples` items (all of them if None)."""
    n = len(dataset)  # type: ignore[arg-type]
    if max_samples is None or max_samples >= n:
        return dataset
    keep = np.random.default_rng(seed).choice(n, size=max_samples, replace=False)
    return Subset(dataset, sorted(keep.tolist()))


def class_prompts(class_names: Sequence[str], template: str) -> list[str]:
    """`template` (e.g. "a photo of a {name}") filled with each class name."""
    return [template.format(name=name) for name in class_names]


def sample_ids(dataset: Dataset) -> list[str]:
    """The id of every sample of `dataset`, without decoding any file where the dataset can
    name its samples (`sample_id`), through `Subset`s."""
    if isinstance(dataset, Subset):
        inner = sample_ids(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    n = len(dataset)  # type: ignore[arg-type]
    named = getattr(dataset, "sample_id", None)
    if named is not None:
        return [named(i) for i in range(n)]
    return [dataset[i]["id"] for i in range(n)]
