"""A local Hugging Face dataset as a data source (`data.name=hf`), read with `datasets`.

`data.hf.path` is a `save_to_disk` folder, a folder of .parquet / .arrow files (splits named by
their files, as `datasets` infers them), or, with `data.hf.builder=imagefolder|audiofolder`, a
folder of media files (`ROOT/<split>/<class>/<file>` or `ROOT/<class>/<file>`). Columns map to
modalities through `data.hf.columns` (default: columns named image / audio / text); image and
audio columns are read undecoded and decoded here (PIL, soundfile), so a bad row raises
`DataError` naming the split and row, or is skipped under `data.on_error=skip`.

The dataset is map-style: it goes through the same sampler as a manifest, so the exact mid-epoch
resume holds. Labels: a ClassLabel column keeps its names; a string column's classes are its
distinct train values (numbers in numeric order); an integer column's are "0".."max".
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mmkd.data.base import (
    MODALITIES,
    DatasetSplits,
    DataSettings,
    RawSample,
    SafeDataset,
    register_dataset,
)
from mmkd.data.base import holdout_split as holdout
from mmkd.data.decode import decode_audio, decode_image, read_audio, read_image
from mmkd.data.manifest import _natural
from mmkd.errors import ConfigError, DataError, SettingError
from mmkd.settings import Settings

BUILDERS = ("imagefolder", "audiofolder", "parquet", "arrow", "csv", "json")
HOLDOUT_SEED = 0


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:  # an optional extra
        raise SettingError(
            "name", "hf needs the `datasets` package: pip install 'mmkd[hf]'"
        ) from None
    return datasets


def load_splits(cfg: DataSettings) -> dict[str, Any]:
    """split name -> datasets.Dataset for data.hf.path."""
    h = cfg.hf
    datasets = _datasets()
    if h.path is None:
        raise SettingError("hf.path", "required when data.name=hf")
    path = Path(h.path).expanduser()
    if not path.exists():
        raise SettingError("hf.path", f"{path} does not exist")
    builder = h.builder
    if builder is not None and builder not in BUILDERS:
        raise SettingError("hf.builder", f"{builder!r} is not one of {', '.join(BUILDERS)}")
    try:
        if builder is None and (
            (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        ):
            loaded = datasets.load_from_disk(str(path))
        else:
            if builder is None:
                found = {p.suffix for p in path.rglob("*") if p.suffix in (".parquet", ".arrow")}
                if len(found) != 1:
                    raise SettingError(
                        "hf.path",
                        f"{path} is not a save_to_disk folder and holds "
                        f"{'no' if not found else 'both'} .parquet / .arrow files; set "
                        f"data.hf.builder ({', '.join(BUILDERS)})",
                    )
                builder = found.pop().lstrip(".")
            kwargs = {"data_dir": str(path)} if path.is_dir() else {"data_files": str(path)}
            loaded = datasets.load_dataset(builder, cache_dir=h.cache_dir, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types for unreadable folders and files
        raise SettingError("hf.path", f"{path} cannot be loaded: {err}") from None
    if isinstance(loaded, datasets.Dataset):
        return {h.train_split: loaded}
    return dict(loaded)


def modality_columns(cfg: DataSettings, table: Any) -> dict[str, str]:
    """modality -> column of the train split."""
    unknown = sorted(set(cfg.hf.columns) - set(MODALITIES))
    if unknown:
        raise SettingError(
            "hf.columns", f"unknown modality {unknown[0]!r} (valid: {', '.join(MODALITIES)})"
        )
    columns = {m: c for m, c in cfg.hf.columns.items()}
    for modality in MODALITIES:
        if modality not in columns and modality in table.column_names:
            columns[modality] = modality
    for modality, column in columns.items():
        if column not in table.column_names:
            raise SettingError(
                f"hf.columns.{modality}",
                f"no column {column!r} (columns: {', '.join(table.column_names)})",
            )
    if not columns:
        raise SettingError(
            "hf.columns",
            f"none set, and no column is named {', '.join(MODALITIES)} "
            f"(columns: {', '.join(table.column_names)})",
        )
    return dict(sorted(columns.items(), key=lambda item: MODALITIES.index(item[0])))


def undecoded(table: Any, columns: dict[str, str]) -> Any:
    """`table` with its Image / Audio columns read as {bytes, path} (decoded here, per row)."""
    datasets = _datasets()
    for column in columns.values():
        feature = table.features[column]
        if isinstance(feature, datasets.Image | datasets.Audio) and feature.decode:
            table = table.cast_column(column, type(feature)(decode=False))
    return table


def class_names_of(table: Any, column: str) -> list[str]:
    datasets = _datasets()
    feature = table.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = [v for v in table.unique(column) if v is not None]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values, default=-1) + 1)]
    return sorted({str(v) for v in values}, key=_natural)


def _media(value: Any, name: str, modality: str) -> Any:
    """Decode an image / audio cell: {bytes, path}, raw bytes, a path, or already decoded."""
    if isinstance(value, dict) and value.get("array") is not None:
        return np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        decode = decode_image if modality == "image" else decode_audio
        return decode(io.BytesIO(value), f"{name} ({modality})")
    if isinstance(value, str):
        return (read_image if modality == "image" else read_audio)(value)
    raise DataError(f"{name}: {modality} cell holds {type(value).__name__}, not a file")


class HfDataset(SafeDataset):
    """One split of a Hugging Face dataset as raw samples."""

    def __init__(
        self,
        table: Any,
        split: str,
        columns: dict[str, str],
        cfg: DataSettings,
        class_names: list[str],
    ) -> None:
        super().__init__(cfg.on_error)
        self.table = undecoded(table, columns)
        self.split = split
        self.columns = columns
        self.label_column = cfg.hf.label_column if class_names else None
        self.id_column = cfg.hf.id_column
        self.class_index = {name: i for i, name in enumerate(class_names)}
        self.class_label = self.label_column is not None and isinstance(
            table.features[self.label_column], _datasets().ClassLabel
        )

    def __len__(self) -> int:
        return len(self.table)

    def sample_id(self, index: int) -> str:
        if self.id_column is None:
            return f"{self.split}:{index}"
        return str(self.table[index][self.id_column])

    def where(self, index: int) -> str:
        return f"split {self.split} row {index}"

    def label(self, value: Any) -> int | None:
        if value is None:
            return None
        if self.class_label or (isinstance(value, int) and not isinstance(value, bool)):
            index = int(value)
            if not 0 <= index < len(self.class_index):
                raise DataError(f"label {value} is outside the {len(self.class_index)} classes")
            return index
        if str(value) not in self.class_index:
            raise DataError(f"label {value!r} is not one of the train split's labels")
        return self.class_index[str(value)]

    def load(self, index: int) -> RawSample:
        where = self.where(index)
        try:
            row = self.table[index]
            sample: RawSample = {"id": self.sample_id(index), "label": None, "where": where}
            if self.label_column is not None:
                sample["label"] = self.label(row[self.label_column])
            for modality, column in self.columns.items():
                value = row[column]
                if value is None:
                    raise DataError(f"column {column!r} ({modality}) is empty")
                if modality == "text":
                    if not isinstance(value, str):
                        raise DataError(f"column {column!r} holds {type(value).__name__}, not text")
                    sample["text"] = value
                else:
                    sample[modality] = _media(value, where, modality)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        return sample


@dataclass
class HfCfg(Settings):
    """A local Hugging Face dataset (map-style: exact mid-epoch resume holds)."""

    paths: ClassVar = ("path", "cache_dir")

    # a save_to_disk folder, a folder of .parquet / .arrow files, or the data folder of `builder`
    path: str | None = None
    # None: load_from_disk folder, or parquet / arrow files found in path; else a local builder:
    # imagefolder | audiofolder | parquet | arrow | csv | json
    builder: str | None = None
    train_split: str = "train"
    val_split: str = "validation"  # absent from the dataset: held out of train by data.val_fraction
    test_split: str = "test"  # absent from the dataset: the validation split is also the test split
    # modality -> column, e.g. {image: img, text: caption}; unlisted modalities are read from a
    # column of their own name (image / audio / text) when the dataset has one
    columns: dict[str, str] = field(default_factory=dict)
    label_column: str | None = "label"  # None or absent from the dataset: no labels
    id_column: str | None = None  # None: "SPLIT:ROW"
    cache_dir: str | None = None  # where `datasets` caches prepared builders; None: its default


@register_dataset("hf", HfCfg)
def build_hf(cfg: DataSettings) -> DatasetSplits:
    h = cfg.hf
    splits = load_splits(cfg)
    if h.train_split not in splits:
        raise SettingError(
            "hf.train_split", f"no split {h.train_split!r} (splits: {', '.join(splits)})"
        )
    train_table = splits[h.train_split]
    columns = modality_columns(cfg, train_table)
    labelled = h.label_column is not None and h.label_column in train_table.column_names
    class_names = class_names_of(train_table, h.label_column) if labelled else []
    if h.id_column is not None and h.id_column not in train_table.column_names:
        raise SettingError("hf.id_column", f"no column {h.id_column!r}")

    def dataset(split: str) -> HfDataset:
        return HfDataset(splits[split], split, columns, cfg, class_names)

    train: Any = dataset(h.train_split)
    if h.val_split in splits:
        val: Any = dataset(h.val_split)
    else:
        train, val = holdout(train, cfg.val_fraction, HOLDOUT_SEED)
    test = dataset(h.test_split) if h.test_split in splits else val
    return DatasetSplits(train, val, test, modalities=tuple(columns), class_names=class_names)
