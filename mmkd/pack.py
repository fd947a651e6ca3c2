"""`mmkd pack SOURCE OUT_DIR [--shard-size N]`: a dataset as WebDataset tar shards.

SOURCE is a manifest (JSONL / CSV, as for data.name=manifest) or a class-folder dataset
(SOURCE/<class>/<file>: images or audio, the class is the folder name, classes in sorted order).
Shards are OUT_DIR/PREFIX-000000.tar, ... (PREFIX: the source's name, `train` for train.jsonl or
for a folder `train/`); each is written to a temporary file and renamed into place once complete.

A sample keeps its id as its key ('.' and '/' — which webdataset reads as separators — become
'_'), its image / audio file's bytes under the file's extension (jpg / png / webp and wav / flac
as they are; other formats re-encoded to png / flac), its text as .txt and its label as the class
*name* in .cls. Every file is decoded once to check it. OUT_DIR/shards.json records each shard's
sample count and byte size, and the class names, so `data.name=webdataset` needs no counting pass
and maps the names to the same class indices (packing several sources into one OUT_DIR merges
their class names).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import webdataset as wds
from tqdm.auto import tqdm

from mmkd.data.base import MODALITIES, Skipped
from mmkd.data.decode import read_audio, read_image
from mmkd.data.manifest import (
    ClassSet,
    ManifestDataset,
    _label_text,
    _natural,
    _present,
    read_manifest,
)
from mmkd.data.webdataset import EXTENSIONS, INDEX_NAME, LABEL_EXT, read_index
from mmkd.errors import ConfigError, DataError
from mmkd.io import atomic_path, write_json

log = logging.getLogger(__name__)

FOLDER_FILES = {  # class-folder datasets: file suffix -> modality
    **{s: "image" for s in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")},
    **{s: "audio" for s in (".wav", ".flac", ".ogg")},
}
READERS = {"image": read_image, "audio": read_audio}
RESERVED = re.compile(r"[./\\]")


@dataclass
class Packed:
    """What a pack run wrote."""

    shards: dict[str, int]  # shard file name -> samples
    skipped: int
    class_names: list[str]

    @property
    def samples(self) -> int:
        return sum(self.shards.values())


def file_entry(modality: str, path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of a checked image / audio file, re-encoded if its format is not one
    the webdataset source reads."""
    decoded = READERS[modality](path)  # raises DataError naming the file
    ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    if ext in EXTENSIONS[modality]:
        return ext, path.read_bytes()
    buffer = io.BytesIO()
    if modality == "image":
        decoded.save(buffer, format="PNG")
        return "png", buffer.getvalue()
    wave, rate = decoded
    sf.write(buffer, wave, rate, format="FLAC")
    return "flac", buffer.getvalue()


def manifest_samples(
    path: Path, on_error: str
) -> tuple[list[str], int, Iterator[dict[str, Any] | Skipped]]:
    """(class names, sample count, samples) of a manifest; rows are checked as in training."""
    records = read_manifest(path, "SOURCE")
    modalities = tuple(c for c in MODALITIES if any(_present(r, c) for _, r in records))
    if not modalities:
        raise ConfigError(f"SOURCE: {path} has no {', '.join(MODALITIES)} column with values")
    labels = {_label_text(r["label"]) for _, r in records if _present(r, "label")}
    labels.discard(None)
    classes = ClassSet(sorted(labels, key=_natural), indices_allowed=False)  # type: ignore[arg-type]
    dataset = ManifestDataset(path, records, modalities, classes, on_error)

    def samples() -> Iterator[dict[str, Any] | Skipped]:
        for index, row in enumerate(dataset.rows):
            loaded = dataset[index]  # decodes every file: a bad row raises or is Skipped
            if isinstance(loaded, Skipped):
                yield loaded
                continue
            try:
                entry: dict[str, Any] = {"__key__": row.id}
                for column, value in (row.values or {}).items():
                    if column == "text":
                        entry["txt"] = value.encode("utf-8")
                    else:
                        ext, data = file_entry(column, path.parent / value)
                        entry[ext] = data
                if row.label is not None:
                    entry[LABEL_EXT] = classes.names[row.label].encode("utf-8")
            except DataError as err:
                if on_error != "skip":
                    raise DataError(f"{dataset.where(row.line)}: {err}") from None
                yield Skipped(row.id, f"{dataset.where(row.line)}: {err}")
                continue
            yield entry

    return classes.names, len(dataset), samples()


def folder_samples(
    root: Path, on_error: str
) -> tuple[list[str], int, Iterator[dict[str, Any] | Skipped]]:
    """(class names, sample count, samples) of ROOT/<class>/<file>."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"SOURCE: folder {root} has no class folders (ROOT/<class>/<file>)")
    files = [
        (name, path)
        for name in classes
        for path in sorted((root / name).iterdir())
        if path.is_file() and not path.name.startswith(".")
    ]
    kinds = {FOLDER_FILES.get(path.suffix.lower()) for _, path in files} - {None}
    if len(kinds) > 1:
        raise ConfigError(f"SOURCE: {root} mixes image and audio files; pack them separately")

    def samples() -> Iterator[dict[str, Any] | Skipped]:
        for name, path in files:
            modality = FOLDER_FILES.get(path.suffix.lower())
            try:
                if modality is None:
                    known = ", ".join(sorted(FOLDER_FILES))
                    raise DataError(f"{path}: not an image or audio file ({known})")
                ext, data = file_entry(modality, path)
            except DataError as err:
                if on_error != "skip":
                    raise
                yield Skipped(f"{name}/{path.stem}", str(err))
                continue
            key = f"{name}/{path.stem}"
            yield {"__key__": key, ext: data, LABEL_EXT: name.encode("utf-8")}

    return classes, len(files), samples()


class ShardSink:
    """Writes samples into PREFIX-NNNNNN.tar shards of `size` samples, each one atomically."""

    def __init__(self, out_dir: Path, prefix: str, size: int) -> None:
        self.out_dir, self.prefix, self.size = out_dir, prefix, size
        self.shards: dict[str, int] = {}
        self._stack: contextlib.ExitStack | None = None
        self._writer: wds.TarWriter | None = None
        self._name = ""

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None:
            self._name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._stack = contextlib.ExitStack()
            tmp = self._stack.enter_context(atomic_path(self.out_dir / self._name))
            self._writer = self._stack.enter_context(wds.TarWriter(str(tmp), mtime=0))
            self.shards[self._name] = 0
        self._writer.write(sample)
        self.shards[self._name] += 1
        if self.shards[self._name] == self.size:
            self.close()

    def close(self) -> None:
        """Finish the open shard (the temporary file is renamed into place)."""
        if self._stack is not None:
            self._stack.close()
        self._stack, self._writer = None, None

    def abort(self) -> None:
        """Drop the open shard (its temporary file is removed)."""
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self.shards.pop(self._name, None)
        self._stack, self._writer = None, None


def pack(
    source: Path,
    out_dir: Path,
    *,
    shard_size: int = 1000,
    prefix: str | None = None,
    on_error: str = "raise",
    progress: bool = True,
) -> Packed:
    """Convert `source` (manifest file or class folder) into shards in `out_dir`."""
    if shard_size <= 0:
        raise ConfigError(f"--shard-size: must be > 0, got {shard_size}")
    if source.is_dir():
        class_names, total, samples = folder_samples(source, on_error)
    elif source.is_file():
        class_names, total, samples = manifest_samples(source, on_error)
    else:
        raise ConfigError(f"SOURCE: {source} does not exist")
    prefix = prefix or source.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob(f"{prefix}-*.tar")):
        raise ConfigError(
            f"OUT_DIR: {out_dir} already holds {prefix}-*.tar shards; choose another OUT_DIR "
            "or --prefix"
        )
    sink, keys, skipped = ShardSink(out_dir, prefix, shard_size), set(), 0
    try:
        for sample in tqdm(samples, total=total, desc=f"pack {source.name}", disable=not progress):
            if not isinstance(sample, Skipped):
                key = RESERVED.sub("_", str(sample["__key__"]))
                if key in keys:
                    sample = Skipped(key, f"key {key!r} repeats an earlier sample's")
                    if on_error != "skip":
                        raise DataError(f"sample {sample.id}: {sample.reason}")
                else:
                    keys.add(key)
                    sink.write({**sample, "__key__": key})
                    continue
            log.warning("skipped sample %s: %s", sample.id, sample.reason)
            skipped += 1
    except BaseException:
        sink.abort()
        raise
    sink.close()
    if not sink.shards:
        raise DataError(f"SOURCE: {source} gave no usable sample ({skipped} skipped)")
    write_index(out_dir, sink.shards, class_names)
    return Packed(sink.shards, skipped, class_names)


def write_index(out_dir: Path, shards: dict[str, int], class_names: Sequence[str]) -> None:
    """Add these shards and class names to OUT_DIR/shards.json (written atomically)."""
    index = read_index(out_dir)
    entries = index.get("shards", {})
    for name, samples in shards.items():
        entries[name] = {"samples": samples, "bytes": (out_dir / name).stat().st_size}
    names = sorted({*index.get("class_names", []), *class_names}, key=_natural)
    write_json(out_dir / INDEX_NAME, {"format": 1, "shards": entries, "class_names": names})


def command(argv: Sequence[str]) -> int:
    """`mmkd pack` on the command line."""
    parser = argparse.ArgumentParser(
        prog="mmkd pack",
        description="Convert a manifest (JSONL/CSV) or a class-folder dataset into WebDataset "
        "shards (use them with data.name=webdataset data.webdataset.train=OUT_DIR).",
    )
    parser.add_argument("source", type=Path, help="a .jsonl / .csv manifest, or ROOT/<class>/")
    parser.add_argument("out_dir", type=Path, help="folder for the shards and shards.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", help="shard name prefix (default: the source's name)")
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="a bad sample stops the run (raise) or is skipped and counted (skip)",
    )
    args = parser.parse_args(argv)
    packed = pack(
        args.source,
        args.out_dir,
        shard_size=args.shard_size,
        prefix=args.prefix,
        on_error=args.on_error,
    )
    print(
        f"packed {packed.samples} samples into {len(packed.shards)} shard(s) in {args.out_dir} "
        f"({packed.skipped} skipped, {len(packed.class_names)} classes)"
    )
    return 0
