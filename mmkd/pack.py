"""`mmkd pack SOURCE OUT_DIR [--shard-size N]`: a dataset as WebDataset tar shards.

SOURCE is a manifest (JSONL / CSV, as for data.name=manifest) or a class-folder dataset
(SOURCE/<class>/<file>, files in sub-folders of a class folder included, as data.name=folder reads
it: images or audio, the class is the top folder's name, classes in plain sorted order as the
folder dataset numbers them; a manifest's classes in the manifest dataset's order).
Shards are OUT_DIR/PREFIX-000000.tar, ... (PREFIX: the source's name, `train` for train.jsonl or
for a folder `train/`); each is written to a temporary file and renamed into place once complete.

Samples go into the shards in a seeded shuffle of the source's order (`--seed`; `--keep-order`
keeps it), so a source sorted by class still gives shards that mix the classes, as the
streaming shuffle buffer (which only mixes within ~1,000 samples) needs.

A sample keeps its id as its key ('.' and '/' — which webdataset reads as separators — become
'_'), its image / audio file's bytes under the file's extension (jpg / png / webp and wav / flac
as they are; other formats re-encoded to png / flac), its text as .txt and its label as the class
*name* in .cls. Every file is decoded once to check it.

Completeness: while a pack runs, OUT_DIR/PREFIX.packing.json records the settings and the shards
finished so far; training refuses shards of a folder holding one. OUT_DIR/shards.json — each
shard's sample count and byte size, and the class names — is written LAST, then the packing file
is removed. Rerunning the same command after a kill or a failure resumes: finished shards are
kept (checked by byte size), the rest are written again. `--restart` discards them instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import webdataset as wds
from tqdm.auto import tqdm

from mmkd.cli import command_parser
from mmkd.data.base import MODALITIES, Skipped
from mmkd.data.decode import read_audio, read_image
from mmkd.data.folder import scan_class_folders
from mmkd.data.manifest import (
    ClassSet,
    ManifestDataset,
    _label_text,
    _natural,
    _present,
    read_manifest,
)
from mmkd.data.webdataset import EXTENSIONS, INDEX_NAME, LABEL_EXT, PACKING_SUFFIX, read_index
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
    resumed: int = 0  # shards kept from an earlier, interrupted run

    @property
    def samples(self) -> int:
        return sum(self.shards.values())


@dataclass(frozen=True)
class Source:
    """A source's class names and its samples, each named by its shard key before any file is
    read (`load(i)` reads and checks sample i; DataError or Skipped when it is unusable)."""

    class_names: list[str]
    keys: list[str]
    load: Callable[[int], dict[str, Any] | Skipped]


def shard_key(sample_id: str) -> str:
    return RESERVED.sub("_", sample_id)


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


def manifest_source(path: Path, on_error: str) -> Source:
    """A manifest's rows (checked as in training); classes in the manifest dataset's order."""
    records = read_manifest(path, "SOURCE")
    modalities = tuple(c for c in MODALITIES if any(_present(r, c) for _, r in records))
    if not modalities:
        raise ConfigError(f"SOURCE: {path} has no {', '.join(MODALITIES)} column with values")
    labels = {_label_text(r["label"]) for _, r in records if _present(r, "label")}
    labels.discard(None)
    classes = ClassSet(sorted(labels, key=_natural), indices_allowed=False)  # type: ignore[arg-type]
    dataset = ManifestDataset(path, records, modalities, classes, on_error)

    def load(index: int) -> dict[str, Any] | Skipped:
        row = dataset.rows[index]
        loaded = dataset[index]  # decodes every file: a bad row raises or is Skipped
        if isinstance(loaded, Skipped):
            return loaded
        try:
            entry: dict[str, Any] = {}
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
            return Skipped(row.id, f"{dataset.where(row.line)}: {err}")
        return entry

    return Source(classes.names, [shard_key(row.id) for row in dataset.rows], load)


def folder_source(root: Path, on_error: str) -> Source:
    """ROOT/<class>/<file> (files in a class folder's sub-folders too), as data.name=folder."""
    found = scan_class_folders(root, "SOURCE")  # hidden files / folders are not samples
    classes = sorted(found)  # the folder dataset's class order (plain sort, as ImageFolder)
    files = [(name, rel) for name in classes for rel in found[name]]
    media = [(name, rel) for name, rel in files if Path(rel).suffix.lower() in FOLDER_FILES]
    empty = sorted(set(classes) - {name for name, _ in media})
    if empty:
        raise ConfigError(f"SOURCE: class folder {root / empty[0]} holds no image or audio file")
    kinds = {FOLDER_FILES[Path(rel).suffix.lower()] for _, rel in media}
    if len(kinds) > 1:
        raise ConfigError(f"SOURCE: {root} mixes image and audio files; pack them separately")

    def load(index: int) -> dict[str, Any] | Skipped:
        name, rel = files[index]
        path = root / rel
        modality = FOLDER_FILES.get(path.suffix.lower())
        try:
            if modality is None:
                known = ", ".join(sorted(FOLDER_FILES))
                raise DataError(f"{path}: not an image or audio file ({known})")
            ext, data = file_entry(modality, path)
        except DataError as err:
            if on_error != "skip":
                raise
            return Skipped(rel, str(err))
        return {ext: data, LABEL_EXT: name.encode("utf-8")}

    keys = [shard_key(os.path.splitext(rel)[0]) for _, rel in files]
    return Source(classes, keys, load)


class ShardSink:
    """Writes samples into PREFIX-NNNNNN.tar shards of `size` samples, each one atomically;
    `on_close(name, samples)` is called once a shard is in place."""

    def __init__(
        self,
        out_dir: Path,
        prefix: str,
        size: int,
        first: int = 0,
        on_close: Callable[[str, int], None] | None = None,
    ) -> None:
        self.out_dir, self.prefix, self.size = out_dir, prefix, size
        self.next_index = first
        self.on_close = on_close
        self.count = 0
        self._stack: contextlib.ExitStack | None = None
        self._writer: wds.TarWriter | None = None
        self._name = ""

    @property
    def open(self) -> bool:
        return self._writer is not None

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None:
            self._name = f"{self.prefix}-{self.next_index:06d}.tar"
            self.next_index += 1
            self._stack = contextlib.ExitStack()
            tmp = self._stack.enter_context(atomic_path(self.out_dir / self._name))
            self._writer = self._stack.enter_context(wds.TarWriter(str(tmp), mtime=0))
            self.count = 0
        self._writer.write(sample)
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count >= self.size

    def close(self) -> None:
        """Finish the open shard (the temporary file is renamed into place)."""
        if self._stack is not None:
            self._stack.close()
            if self.on_close is not None:
                self.on_close(self._name, self.count)
        self._stack, self._writer = None, None

    def abort(self) -> None:
        """Drop the open shard (its temporary file is removed)."""
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._stack, self._writer = None, None


def packing_path(out_dir: Path, prefix: str) -> Path:
    return out_dir / f"{prefix}{PACKING_SUFFIX}"


def resume_state(
    out_dir: Path, prefix: str, settings: dict[str, Any], restart: bool
) -> dict[str, Any]:
    """The state of an unfinished pack of these settings to go on from (shards checked by
    size), or a fresh one. Refuses a folder that already holds a finished pack of PREFIX."""
    state_path = packing_path(out_dir, prefix)
    existing = sorted(out_dir.glob(f"{prefix}-*.tar"))
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if restart:
        for path in existing:
            path.unlink()
        state_path.unlink(missing_ok=True)
        existing, state = [], None
    if state is None and existing:
        indexed = read_index(out_dir).get("shards", {})
        what = "a finished pack" if all(p.name in indexed for p in existing) else "shards"
        raise ConfigError(
            f"OUT_DIR: {out_dir} already holds {prefix}-*.tar {what}; choose another OUT_DIR or "
            "--prefix (or --restart to replace them)"
        )
    if state is not None and state.get("settings") != settings:
        raise ConfigError(
            f"OUT_DIR: {state_path} is an unfinished pack with other settings "
            f"({state.get('settings')}); rerun that command to finish it, or --restart"
        )
    fresh = {"settings": settings, "done": [], "skipped": 0, "next": 0}
    if state is None:
        return fresh
    kept = []
    for shard in state["done"]:  # finished shards, in order; stop at the first that changed
        path = out_dir / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            break
        kept.append(shard)
    state = {**state, "done": kept}
    if kept:
        state["next"], state["skipped"] = kept[-1]["next"], kept[-1]["skipped"]
    else:
        state["next"], state["skipped"] = 0, 0
    names = {shard["name"] for shard in kept}
    for path in existing:  # shards written after the last finished one are written again
        if path.name not in names:
            path.unlink()
    for path in out_dir.glob(f".{prefix}-*.tar.*.tmp"):  # a killed run's half-written shard
        path.unlink()
    return state


def pack(
    source: Path,
    out_dir: Path,
    *,
    shard_size: int = 1000,
    prefix: str | None = None,
    on_error: str = "raise",
    seed: int | None = 0,
    restart: bool = False,
    progress: bool = True,
) -> Packed:
    """Convert `source` (manifest file or class folder) into shards in `out_dir`, its samples in
    a shuffle seeded by `seed` (None: the source's order)."""
    if shard_size <= 0:
        raise ConfigError(f"--shard-size: must be > 0, got {shard_size}")
    if source.is_dir():
        src = folder_source(source, on_error)
    elif source.is_file():
        src = manifest_source(source, on_error)
    else:
        raise ConfigError(f"SOURCE: {source} does not exist")
    prefix = prefix or source.stem
    order = list(range(len(src.keys)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    first: dict[str, int] = {}  # key -> position in the order of its first sample
    for position, index in enumerate(order):
        key = src.keys[index]
        if key in first and on_error != "skip":
            raise DataError(f"SOURCE: sample {key!r} repeats the key of an earlier sample")
        first.setdefault(key, position)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "source": str(source.absolute()),
        "samples": len(order),
        "shard_size": shard_size,
        "seed": seed,
        "on_error": on_error,
    }
    state = resume_state(out_dir, prefix, settings, restart)
    resumed = len(state["done"])
    if resumed:
        log.info("resuming the pack of %s: %d finished shard(s) kept", source, resumed)
    write_json(packing_path(out_dir, prefix), state)
    skipped = state["skipped"]
    position = state["next"]

    def finished(name: str, samples: int) -> None:
        entry = {"name": name, "samples": samples, "bytes": (out_dir / name).stat().st_size}
        state["done"].append({**entry, "next": position + 1, "skipped": skipped})
        write_json(packing_path(out_dir, prefix), state)

    sink = ShardSink(out_dir, prefix, shard_size, first=resumed, on_close=finished)
    bar = tqdm(total=len(order), initial=position, desc=f"pack {source.name}", disable=not progress)
    try:
        for position in range(state["next"], len(order)):
            index = order[position]
            key = src.keys[index]
            sample = (
                src.load(index)
                if first[key] == position
                else Skipped(key, f"key {key!r} repeats an earlier sample's")
            )
            if isinstance(sample, Skipped):
                log.warning("skipped sample %s: %s", sample.id, sample.reason)
                skipped += 1
            else:
                sink.write({**sample, "__key__": key})
                if sink.full:
                    sink.close()
            bar.update()
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    shards = {shard["name"]: shard["samples"] for shard in state["done"]}
    if not shards:
        raise DataError(f"SOURCE: {source} gave no usable sample ({skipped} skipped)")
    write_index(out_dir, shards, src.class_names)  # last: it marks the pack complete
    packing_path(out_dir, prefix).unlink()
    return Packed(shards, skipped, src.class_names, resumed)


def merged_class_names(old: Sequence[str], new: Sequence[str]) -> list[str]:
    """Class names of a folder that already held a pack: the earlier order when it covers the
    new names, else the new order followed by the earlier names it lacks."""
    if not old or set(new) <= set(old):
        return list(old) or list(new)
    return [*new, *(name for name in old if name not in set(new))]


def write_index(out_dir: Path, shards: dict[str, int], class_names: Sequence[str]) -> None:
    """Add these shards (name -> samples) and class names to OUT_DIR/shards.json (atomically)."""
    index = read_index(out_dir)
    entries = index.get("shards", {})
    for name, samples in shards.items():
        entries[name] = {"samples": samples, "bytes": (out_dir / name).stat().st_size}
    names = merged_class_names(index.get("class_names", []), class_names)
    write_json(out_dir / INDEX_NAME, {"format": 1, "shards": entries, "class_names": names})


def command(argv: Sequence[str]) -> int:
    """`mmkd pack` on the command line."""
    parser = command_parser(
        "pack",
        "Convert a manifest (JSONL/CSV) or a class-folder dataset into WebDataset shards\n"
        "(use them with data.name=webdataset data.webdataset.train=OUT_DIR). Rerun the same\n"
        "command after an interruption to finish the pack.",
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
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the shuffle that mixes classes across shards"
    )
    parser.add_argument(
        "--keep-order", action="store_true", help="keep the source's order (no shuffle)"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard an unfinished pack's shards in OUT_DIR instead of resuming it",
    )
    args = parser.parse_args(argv)
    packed = pack(
        args.source,
        args.out_dir,
        shard_size=args.shard_size,
        prefix=args.prefix,
        on_error=args.on_error,
        seed=None if args.keep_order else args.seed,
        restart=args.restart,
    )
    resumed = f", {packed.resumed} kept from an interrupted run" if packed.resumed else ""
    print(
        f"packed {packed.samples} samples into {len(packed.shards)} shard(s) in {args.out_dir} "
        f"({packed.skipped} skipped, {len(packed.class_names)} classes{resumed})"
    )
    return 0
