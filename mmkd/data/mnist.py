"""MNIST from its IDX files (gzip or plain), held in memory.

Splits: train = the train file minus a fixed holdout of `data.val_fraction` (seed 0, so
the validation set does not move with run.seed), val = that holdout, test = `data.mnist.split`
(test: the t10k file; train: the whole train file).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
from torch.utils.data import Dataset, Subset

from mmkd.data.base import (
    HOLDOUT_SEED,
    DatasetSplits,
    DataSettings,
    RawSample,
    class_prompts,
    holdout_split,
    register_dataset,
)
from mmkd.data.decode import data_folder
from mmkd.errors import DataError, SettingError
from mmkd.settings import Settings

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FILE_PREFIX = {"train": "train", "test": "t10k"}
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def digit_prompts(cfg: DataSettings) -> list[str]:
    """`data.prompt_template` filled with each digit's name, index = digit."""
    try:
        return class_prompts(DIGIT_NAMES, cfg.prompt_template)
    except (KeyError, IndexError, ValueError) as err:
        raise SettingError(
            "prompt_template",
            f"{cfg.prompt_template!r} must contain only the "
            f"{{name}} field ({type(err).__name__}: {err})",
        ) from None


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (gzip-compressed or not), checking its magic number and size."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read or decompressed: {err}") from err
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes) but the "
            f"file holds {len(raw) - header} bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class MnistPart:
    """One MNIST file pair in memory: "train" (train-*) or "test" (t10k-*)."""

    name: str
    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # int64 (N,), 0-9


def find_idx(folder: Path, part: str, kind: str) -> Path:
    """The IDX file of `part` and `kind` in `folder`, gzip-compressed or plain."""
    stem = f"{FILE_PREFIX[part]}-{kind}-ubyte"
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise SettingError("mnist.root", f"{folder} has no {stem}.gz (or {stem})")


@lru_cache(maxsize=4)
def _load_part(
    images_path: Path, labels_path: Path, _stamp: tuple[int, ...], name: str
) -> MnistPart:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{labels_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(DIGIT_NAMES):
        raise DataError(f"{labels_path}: label {labels.max()} is not a digit 0-9")
    images.flags.writeable = False  # shared by every dataset built from the cache
    return MnistPart(name, images, labels.astype(np.int64))


def load_part(folder: Path, part: str) -> MnistPart:
    """Images and labels of `part` ("train" | "test"), read once per file version."""
    images, labels = find_idx(folder, part, "images-idx3"), find_idx(folder, part, "labels-idx1")
    stamp = tuple(x for p in (images, labels) for x in (p.stat().st_mtime_ns, p.stat().st_size))
    return _load_part(images.resolve(), labels.resolve(), stamp, part)


class MnistDataset(Dataset):
    """Items of one MNIST part: id "mnist-PART-INDEX", label, 28x28 uint8 image, digit prompt."""

    def __init__(self, part: MnistPart, prompts: list[str]) -> None:
        self.part = part
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.part.labels)

    def sample_id(self, index: int) -> str:
        return f"mnist-{self.part.name}-{index}"

    def __getitem__(self, index: int) -> RawSample:
        label = int(self.part.labels[index])
        return {
            "id": self.sample_id(index),
            "label": label,
            "image": self.part.images[index].copy(),
            "text": self.prompts[label],
        }


@dataclass(frozen=True)
class MnistPools:
    """The MNIST datasets behind each split, and which indices of them each split uses."""

    whole_train: MnistDataset  # the whole train file
    test: MnistDataset  # the whole t10k file
    train: Subset  # train file minus the val holdout (`.indices` into whole_train)
    val: Subset  # the val holdout


def mnist_pools(cfg: DataSettings) -> MnistPools:
    """Load MNIST for the `data` config `cfg` and split the train file (fixed holdout)."""
    folder = data_folder(cfg, "mnist", "mnist")
    prompts = digit_prompts(cfg)
    whole_train = MnistDataset(load_part(folder, "train"), prompts)
    test = MnistDataset(load_part(folder, "test"), prompts)
    train, val = holdout_split(whole_train, cfg.val_fraction, HOLDOUT_SEED)
    return MnistPools(whole_train, test, train, val)


@dataclass
class MnistCfg(Settings):
    """MNIST IDX files (*-images-idx3-ubyte[.gz], *-labels-idx1-ubyte[.gz])."""

    paths: ClassVar = ("root",)
    choices: ClassVar = {"split": ("train", "test")}

    root: str | None = None
    split: str = "test"  # evaluation split: train | test


@register_dataset("mnist", MnistCfg)
def build_mnist(cfg: DataSettings) -> DatasetSplits:
    """MNIST train minus a fixed holdout, that holdout, and the `data.mnist.split` test set."""
    if cfg.mnist.split not in FILE_PREFIX:
        raise SettingError("mnist.split", f"must be train or test, got {cfg.mnist.split!r}")
    pools = mnist_pools(cfg)
    return DatasetSplits(
        train=pools.train,
        val=pools.val,
        test=pools.test if cfg.mnist.split == "test" else pools.whole_train,
        modalities=("image", "text"),
        class_names=list(DIGIT_NAMES),
    )
