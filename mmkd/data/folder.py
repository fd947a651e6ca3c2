"""Class-folder datasets: `ROOT/<class>/<file>`, the layout torchvision's ImageFolder reads.

Images (jpg/png/webp/...) or audio (wav/flac/ogg/...): the modality is whatever the train
folder's files are (both at once is a config error). Class index = position of the class folder
in sorted order. Sample ids are the paths relative to the split's root ("cat/0001.jpg"). Files
with other extensions (and hidden files) are not samples: they are counted and logged, never
silently dropped. Validation and test folders may be given (`data.folder.val` / `test`), or
validation is a fixed, seeded split of the train folder (`data.folder.val_size`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig

from mmkd.data.base import (
    DatasetSplits,
    DataSettings,
    RawSample,
    SafeDataset,
    holdout_split,
    register_dataset,
)
from mmkd.data.decode import read_audio, read_image
from mmkd.errors import ConfigError, SettingError
from mmkd.settings import Settings

log = logging.getLogger(__name__)

EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "audio": (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3"),
}
READERS = {"image": read_image, "audio": read_audio}


def modality_of(path: str) -> str | None:
    suffix = os.path.splitext(path)[1].lower()
    return next((m for m, exts in EXTENSIONS.items() if suffix in exts), None)


def scan_class_folders(root: Path, field: str) -> dict[str, list[str]]:
    """{class name: sorted file paths relative to root} for every sub-folder of `root`; a
    problem is a SettingError of `field`, the setting that named `root`."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise SettingError(field, f"folder {root} {what}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise SettingError(field, f"{root} has no class sub-folders (expected ROOT/<class>/<file>)")
    files: dict[str, list[str]] = {}
    for name in classes:
        found = []
        for folder, dirs, names in os.walk(root / name, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(folder, root)
            found += [os.path.join(rel, n) for n in names if not n.startswith(".")]
        files[name] = sorted(found)
    return files


class FolderDataset(SafeDataset):
    """The files of one class-folder tree; decoded (and checked) when a sample is loaded."""

    def __init__(
        self,
        root: Path,
        items: list[tuple[str, int]],
        modality: str,
        class_names: list[str],
        on_error: str = "raise",
    ) -> None:
        super().__init__(on_error)
        self.root = root
        self.items = items
        self.modality = modality
        self.class_names = class_names
        self.read = READERS[modality]

    def __len__(self) -> int:
        return len(self.items)

    def sample_id(self, index: int) -> str:
        return self.items[index][0]

    def decode_sources(self, index: int) -> dict[str, Path]:
        """The file each modality of sample `index` is decoded from (keys the decode cache)."""
        return {self.modality: self.root / self.items[index][0]}

    def load(self, index: int) -> RawSample:
        path, label = self.items[index]
        return {"id": path, "label": label, self.modality: self.read(self.root / path)}

    def sample_files(self, index: int) -> list[str]:
        """The files sample `index` is read from (the teacher store keys their identity)."""
        return [os.path.join(self.root, self.items[index][0])]


def index_folder(
    root: Path, field: str, class_names: list[str] | None, modality: str | None, on_error: str
) -> FolderDataset:
    """Scan `root` (the folder setting `field` names); `class_names` (from the train folder) fixes
    the label of each class folder."""
    files = scan_class_folders(root, field)
    if class_names is not None:
        unknown = sorted(set(files) - set(class_names))
        if unknown:
            raise SettingError(
                field,
                f"class folder(s) {', '.join(unknown)} in {root} are not train classes "
                f"({', '.join(class_names)})",
            )
    names = class_names or sorted(files)
    kinds: Counter[str | None] = Counter()
    ignored: Counter[str] = Counter()
    items: list[tuple[str, int]] = []
    for name, paths in files.items():
        if not paths:
            raise SettingError(field, f"class folder {root / name} holds no files")
        for path in paths:
            kind = modality_of(path)
            kinds[kind] += 1
            if kind is None:
                ignored[os.path.splitext(path)[1].lower() or "(no extension)"] += 1
            else:
                items.append((path, names.index(name)))
    found = sorted(k for k in kinds if k is not None)
    if len(found) > 1:
        raise SettingError(field, f"{root} mixes {' and '.join(found)} files; use one modality")
    if not found:
        raise SettingError(field, f"{root} holds no image or audio files")
    if modality is not None and found[0] != modality:
        raise SettingError(field, f"{root} holds {found[0]} files, the train folder {modality}")
    used = {label for _, label in items}
    empty = [name for name in files if names.index(name) not in used]
    if empty:
        raise SettingError(
            field,
            f"class folder {root / empty[0]} holds no {found[0]} file (a class with no "
            "samples); remove the folder or add its files",
        )
    if ignored:
        shown = ", ".join(f"{ext} ({n})" for ext, n in ignored.most_common())
        count = sum(ignored.values())
        log.warning("%s: ignored %d files that are not %s: %s", root, count, found[0], shown)
    return FolderDataset(root, items, found[0], names, on_error)


@dataclass
class FolderCfg(Settings):
    """Class folders, ROOT/<class>/<file> (images or audio), as torchvision's ImageFolder reads."""

    paths: ClassVar = ("train", "val", "test")

    train: str | None = None  # train root; class index = sorted class-folder order
    val: str | None = None  # None: a fixed seeded split of train (val_size)
    test: str | None = None  # None: the validation split is also the test split
    val_size: Any = 0.1  # held out of train when val is None: a count, or a fraction below 1
    split_seed: int = 0  # which train files are held out (fixed as run.seed changes)

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        super().check(cfg, key)
        size = cfg.val_size
        if isinstance(size, bool) or not isinstance(size, int | float) or size < 0:
            raise ConfigError(
                f"{key}.val_size: must be a count or a fraction below 1, got {size!r}"
            )
        if isinstance(size, float) and size >= 1 and not size.is_integer():
            raise ConfigError(f"{key}.val_size: {size} is neither a count nor a fraction")


@register_dataset("folder", FolderCfg)
def build_folder(cfg: DataSettings) -> DatasetSplits:
    f = cfg.folder
    if f.train is None:
        raise SettingError("folder.train", "required when data.name=folder (ROOT/<class>/<file>)")
    train = index_folder(Path(f.train).expanduser(), "folder.train", None, None, cfg.on_error)
    names = train.class_names
    # read as frames, labels are dropped: val / test folders may hold any class folders
    frames = getattr(cfg, "frames", None) is not None and cfg.frames.window is not None

    def optional(key: str) -> FolderDataset | None:
        value = getattr(f, key)
        if value is None:
            return None
        return index_folder(
            Path(value).expanduser(),
            f"folder.{key}",
            None if frames else names,
            train.modality,
            cfg.on_error,
        )

    val = optional("val")
    train_split = train
    if val is None:
        train_split, val = holdout_split(train, f.val_size, f.split_seed)
    test = optional("test")
    return DatasetSplits(
        train_split, val, val if test is None else test, (train.modality,), class_names=names
    )
