"""Decoded-sample cache: decode every sample of a split once into memory-mapped arrays.

`data.decode_cache=auto|true|false`. Each split's samples are decoded once, through the
dataset's own reader (so its checks and `on_error` apply), and written as flat arrays, one per
modality per chunk of samples:

- images: uint8 at their stored size, (H, W) for mode L, (H, W, 3) for RGB, (H, W, 4) for
  RGBA; any other 8-bit mode (P, 1, LA, CMYK, ...) is stored converted to RGB; 16-bit and
  float images are refused (they would not survive uint8);
- audio: the decoded waveform as float32 at the file's own rate (what `read_audio` returns;
  resampling stays in the audio adapter);
- text is not cached here (the tokenisation cache of the text adapter owns it): text fields
  are kept as the strings the dataset returned.

An entry is keyed by the decode settings, the library versions that fix decoding, the
dataset's error policy and each sample's content identity: its id, file path, size and
mtime (`os.stat`, not a hash of the bytes: hashing would read every file at each start-up).
A changed file changes the key, so a new entry is built. A build writes `<key>.partial/`,
one chunk at a time (each chunk's files written atomically, its index last), so a killed
build resumes at the first missing chunk; the folder is renamed to `<key>` when complete.
An entry opens lazily: DataLoader workers and DDP processes receive only its path and map
the same files (shared page cache, no copy).

`auto` turns the cache on for datasets backed by files when the decoded size (estimated
from a probe of decoded samples) is at most `AUTO_RAM_SHARE` of the machine's RAM and
`AUTO_DISK_SHARE` of the free disk at the cache folder, and within `data.decode_cache_max_gb`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mmkd.data.base import DataSettings, RawSample, Skipped
from mmkd.errors import ConfigError, DataError
from mmkd.io import atomic_path, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_SIZE = 1024  # samples per chunk: the unit a killed build resumes from
AUTO_RAM_SHARE = 0.25  # auto: at most this share of the machine's RAM ...
AUTO_DISK_SHARE = 0.5  # ... and of the free disk at the cache folder
PROBE_SAMPLES = 16  # decoded to estimate the size of a split
CACHE_DIR_ENV = "MMKD_CACHE_DIR"  # default root of mmkd's caches ($XDG_CACHE_HOME/mmkd)
DECODE_SETTINGS = {
    "image": "uint8 HW/HWC as stored; L, RGB, RGBA kept, other 8-bit modes converted to RGB",
    "audio": "float32 waveform as soundfile decodes it, at the file's own rate",
}
KEPT_MODES = ("L", "RGB", "RGBA")
REFUSED_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
MODES = ("auto", "true", "false")


def cache_mode(cfg: DataSettings) -> str:
    """`data.decode_cache` as auto | true | false (a YAML boolean is accepted)."""
    value = str(cfg.decode_cache).lower()
    if value not in MODES:
        raise ConfigError(
            f"data.decode_cache: {cfg.decode_cache!r} is not one of auto, true, false"
        )
    return value


def cache_root(cfg: DataSettings) -> Path:
    """`data.decode_cache_dir`, else $MMKD_CACHE_DIR/decoded, else $XDG_CACHE_HOME/mmkd/decoded."""
    if cfg.decode_cache_dir:
        return Path(cfg.decode_cache_dir).expanduser()
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]) / "decoded"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mmkd" / "decoded"


# --------------------------------------------------------------------------- sample identity


def resolve(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    """The base dataset and index behind `dataset[index]`, through `Subset`s."""
    while isinstance(dataset, Subset):
        index = int(dataset.indices[index])
        dataset = dataset.dataset
    return dataset, index


def file_backed(dataset: Dataset) -> bool:
    """True when every sample names the files it decodes (`decode_sources`)."""
    base, _ = resolve(dataset, 0) if len(dataset) else (dataset, 0)  # type: ignore[arg-type]
    return hasattr(base, "decode_sources")


def content_identity(dataset: Dataset) -> str:
    """sha256 over every sample's id and the path, size and mtime of each file it decodes."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):  # type: ignore[arg-type]
        base, index = resolve(dataset, i)
        digest.update(f"{base.sample_id(index)}\x1f".encode())  # type: ignore[attr-defined]
        for modality, path in sorted(base.decode_sources(index).items()):  # type: ignore[attr-defined]
            try:
                stat = os.stat(path)
                stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                stamp = "missing"  # the build reports it (DataError naming the file)
            digest.update(f"{modality}={path}:{stamp}\x1e".encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("pillow", "soundfile", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cache_key(dataset: Dataset, on_error: str) -> tuple[str, dict[str, Any]]:
    """(key, identity) of the entry holding `dataset` decoded."""
    base, _ = resolve(dataset, 0)
    identity = {
        "format": FORMAT_VERSION,
        "decode": DECODE_SETTINGS,
        "libraries": library_versions(),
        "dataset": type(base).__name__,
        "on_error": on_error,
        "count": len(dataset),  # type: ignore[arg-type]
        "samples_sha256": content_identity(dataset),
    }
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24], identity


# --------------------------------------------------------------------------- encoding


def image_array(image: Any, name: str) -> np.ndarray:
    """The pixels of a decoded image as stored in the cache (see the module docstring)."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise DataError(f"{name}: image array of dtype {array.dtype} cannot be cached as uint8")
        return array
    if image.mode in REFUSED_MODES:
        raise DataError(
            f"{name}: {image.mode} image would lose precision as uint8; "
            "set data.decode_cache=false for this data"
        )
    if image.mode not in KEPT_MODES:
        image = image.convert("RGB")
    return np.asarray(image)


def encode(sample: RawSample, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(flat arrays per modality, index entry) of one decoded sample."""
    arrays: dict[str, np.ndarray] = {}
    entry: dict[str, Any] = {}
    for key, value in sample.items():
        if key == "image":
            array = image_array(value, name)
            arrays["image"] = array.reshape(-1)
            entry["image"] = list(array.shape)
        elif key == "audio":
            wave, rate = value
            wave = np.asarray(wave, dtype=np.float32)
            arrays["audio"] = wave.reshape(-1)
            entry["audio"] = [list(wave.shape), int(rate)]
        else:
            entry.setdefault("fields", {})[key] = value
    try:
        json.dumps(entry)
    except TypeError as err:
        raise DataError(f"{name}: a field cannot be cached ({err})") from None
    return arrays, entry


def estimate_bytes(dataset: Dataset) -> int:
    """Decoded size of `dataset`, from up to PROBE_SAMPLES samples spread over it."""
    n = len(dataset)  # type: ignore[arg-type]
    probe = sorted({int(i) for i in np.linspace(0, n - 1, min(n, PROBE_SAMPLES))})
    sizes = []
    for i in probe:
        sample = dataset[i]
        if isinstance(sample, Skipped):
            continue
        arrays, _ = encode(sample, f"sample {i}")
        sizes.append(sum(a.nbytes for a in arrays.values()))
    return int(np.mean(sizes) * n) if sizes else 0


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


# --------------------------------------------------------------------------- the cached split


class DecodedDataset(Dataset):
    """A split read back from a cache entry: samples as the dataset gave them, their image and
    audio as (read-only) views of memory-mapped arrays. Picklable: a copy maps the files
    again on first use, in its own process."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # the entry's key covers every sample's id and its files' paths, sizes and mtimes: the
        # content identity the teacher store keys on (mmkd.store.data_content)
        self.content_key = folder.name
        try:
            meta = json.loads((folder / "meta.json").read_text())
            self.chunk_size = int(meta["chunk_size"])
            self.count = int(meta["count"])
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"decode cache {folder}: unreadable ({err})") from None
        self.entries: list[dict[str, Any]] = []
        self.offsets: list[dict[str, int]] = []
        for start in range(0, self.count, self.chunk_size):
            chunk = json.loads((folder / f"{start:09d}.json").read_text())
            self.entries += chunk["entries"]
            self.offsets += chunk["offsets"]
        if len(self.entries) != self.count:
            raise DataError(f"decode cache {folder}: {len(self.entries)} of {self.count} samples")
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return self.count

    def sample_id(self, index: int) -> str:
        return self.entries[index]["fields"]["id"]

    def array(self, start: int, modality: str) -> np.ndarray:
        key = (start, modality)
        if key not in self._maps:
            mapped = np.load(self.folder / f"{start:09d}.{modality}.npy", mmap_mode="r")
            self._maps[key] = np.asarray(mapped)  # still mapped; slices skip np.memmap's overhead
        return self._maps[key]

    def __getitem__(self, index: int) -> RawSample | Skipped:
        entry = self.entries[index]
        fields = entry["fields"]
        if "skipped" in entry:
            return Skipped(fields["id"], entry["skipped"])
        sample = dict(fields)
        start = index - index % self.chunk_size
        offsets = self.offsets[index]
        if "image" in entry:
            shape = entry["image"]
            flat = self.array(start, "image")
            at = offsets["image"]
            sample["image"] = flat[at : at + math.prod(shape)].reshape(shape)
        if "audio" in entry:
            shape, rate = entry["audio"]
            flat = self.array(start, "audio")
            at = offsets["audio"]
            sample["audio"] = (flat[at : at + math.prod(shape)].reshape(shape), rate)
        return sample


# --------------------------------------------------------------------------- building


def build(
    folder: Path,
    dataset: Dataset,
    identity: dict[str, Any],
    max_bytes: float | None,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
) -> None:
    """Decode `dataset` into the entry `folder`, resuming the chunks of a killed build."""
    count = len(dataset)  # type: ignore[arg-type]
    partial = folder.with_name(folder.name + ".partial")
    layout = {"identity": identity, "count": count, "chunk_size": chunk_size}
    try:
        same = json.loads((partial / "layout.json").read_text()) == layout
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_json(partial / "layout.json", layout)
    starts = list(range(0, count, chunk_size))
    todo = [s for s in starts if not (partial / f"{s:09d}.json").is_file()]
    done_bytes = sum(
        json.loads((partial / f"{s:09d}.json").read_text())["bytes"]
        for s in starts
        if s not in todo
    )
    log.info(
        "decode cache: %d samples into %s (%d of %d chunks left)",
        count,
        folder,
        len(todo),
        len(starts),
    )
    left = sum(min(chunk_size, count - s) for s in todo)  # samples still to decode
    bar = tqdm(total=count, initial=count - left, desc="decode cache", disable=not progress)
    for start in todo:
        stop = min(start + chunk_size, count)
        parts: dict[str, list[np.ndarray]] = {}
        entries: list[dict[str, Any]] = []
        offsets: list[dict[str, int]] = []
        for i in range(start, stop):
            sample = dataset[i]
            if isinstance(sample, Skipped):
                entries.append({"fields": {"id": sample.id}, "skipped": sample.reason})
                offsets.append({})
            else:
                arrays, entry = encode(sample, f"sample {sample.get('id', i)}")
                at = {}
                for modality, array in arrays.items():
                    at[modality] = sum(a.size for a in parts.get(modality, []))
                    parts.setdefault(modality, []).append(array)
                entries.append(entry)
                offsets.append(at)
            bar.update(1)
        chunk_bytes = 0
        for modality, arrays in parts.items():
            flat = np.concatenate(arrays)
            chunk_bytes += flat.nbytes
            path = partial / f"{start:09d}.{modality}.npy"
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, flat)
        done_bytes += chunk_bytes
        chunk = {"entries": entries, "offsets": offsets, "bytes": chunk_bytes}
        write_json(partial / f"{start:09d}.json", chunk)  # written last: marks the chunk done
        left -= stop - start
        expected = done_bytes * count / max(1, count - left)  # extrapolated from the chunks done
        if max_bytes is not None and expected > max_bytes:
            bar.close()
            raise ConfigError(
                f"data.decode_cache_max_gb: the decoded split would take about "
                f"{expected / 1e9:.2f} GB (> {max_bytes / 1e9:g} GB); raise the limit or set "
                "data.decode_cache=false"
            )
    bar.close()
    write_json(partial / "meta.json", {**layout, "bytes": done_bytes})
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)


def entry_bytes(folder: Path) -> int:
    """The decoded bytes an entry holds."""
    return int(json.loads((folder / "meta.json").read_text())["bytes"])


def open_or_build(
    dataset: Dataset,
    root: Path,
    on_error: str,
    max_bytes: float | None,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
) -> DecodedDataset:
    """The cached `dataset`, built first when its entry is missing (one process builds; the
    others wait on a file lock and then open it)."""
    key, identity = cache_key(dataset, on_error)
    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if not (folder / "meta.json").is_file():
            build(folder, dataset, identity, max_bytes, chunk_size, progress)
        else:
            log.info("decode cache: hit %s", folder)
    return DecodedDataset(folder)


def decoded(dataset: Dataset, cfg: DataSettings, split: str) -> Dataset:
    """`dataset` through the decode cache when `data.decode_cache` asks for it (auto: when it
    is backed by files and small enough, see the module docstring); `dataset` otherwise."""
    mode = cache_mode(cfg)
    if mode == "false" or isinstance(dataset, DecodedDataset) or not len(dataset):  # type: ignore[arg-type]
        return dataset
    if not hasattr(dataset, "__getitem__") or not file_backed(dataset):
        if mode == "true":
            log.info("decode cache: the %s split is not read from files; not cached", split)
        return dataset
    root = cache_root(cfg)
    max_bytes = None if cfg.decode_cache_max_gb is None else cfg.decode_cache_max_gb * 1e9
    if mode == "auto":
        size = estimate_bytes(dataset)
        limits = {
            f"{AUTO_RAM_SHARE:.0%} of RAM": AUTO_RAM_SHARE * total_ram(),
            f"{AUTO_DISK_SHARE:.0%} of free disk at {root}": AUTO_DISK_SHARE * free_disk(root),
        }
        if max_bytes is not None:
            limits["data.decode_cache_max_gb"] = max_bytes
        over = [name for name, bound in limits.items() if size > bound]
        if over:
            log.info(
                "decode cache: off for the %s split (about %.2f GB decoded, more than %s)",
                split,
                size / 1e9,
                " and ".join(over),
            )
            return dataset
    else:
        size = estimate_bytes(dataset)
        if max_bytes is not None and size > max_bytes:
            raise ConfigError(
                f"data.decode_cache_max_gb: the decoded {split} split would take about "
                f"{size / 1e9:.2f} GB (> {cfg.decode_cache_max_gb} GB); raise the limit or set "
                "data.decode_cache=false"
            )
    if size > free_disk(root):
        raise ConfigError(
            f"data.decode_cache_dir: {root} has {free_disk(root) / 1e9:.2f} GB free; the decoded "
            f"{split} split needs about {size / 1e9:.2f} GB"
        )
    return open_or_build(dataset, root, cfg.on_error, max_bytes)
