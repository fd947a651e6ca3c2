"""Writing a store entry: the teacher runs over a split's K views chunk by chunk into
preallocated memory-mapped arrays under `ROOT/<key>.partial/`; each chunk is marked done with its
checksum once flushed (a killed build resumes at the first chunk not done), then the id index and
meta.json are written and the folder is renamed into place. A damaged finished entry is repaired
chunk by chunk."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmkd.adapters import Adapter, Preprocessor
from mmkd.data.base import sample_ids
from mmkd.data.datamodule import RoleCollate, ViewedDataset
from mmkd.errors import CheckpointError, ConfigError, DataError, DiskSpaceError
from mmkd.io import check_free_space, write_json
from mmkd.store.coordination import Collective
from mmkd.store.format import (
    DTYPES,
    INDEX,
    check_unique,
    chunk_starts,
    crc,
    encode,
    id_index,
)
from mmkd.store.key import StoreSpec, store_key
from mmkd.store.read import StoreDamaged
from mmkd.store.targets import teacher_outputs

log = logging.getLogger(__name__)


def teacher_collate(
    preprocessor: Preprocessor, *, augmented: bool, seed: int, on_error: str = "raise"
) -> RoleCollate:
    """Batches of the teacher's input alone, as a store build reads them: augmented views
    replayed from `seed` (or the evaluation preprocessing), no labels."""
    return RoleCollate(
        {"teacher": preprocessor},
        train=augmented,
        keep_labels=False,
        num_classes=0,
        on_error=on_error,
        replay_seed=seed,
        warn_skips=False,  # the builder warns once per sample, not once per view
    )


def keep_going() -> None:
    """The default `StoreBuilder.check_stop`: nothing asks a build to stop."""


class StoreBuilder:
    """Runs the teacher over a split's K views and writes the entry, resumably.

    `check_stop` is called between batches and while waiting for another builder; it raises to
    stop the build (a training run passes one that raises on SIGTERM, which Lightning otherwise
    acts on only once training has begun). Finished chunks are kept: the next build resumes."""

    def __init__(
        self,
        teacher: Adapter,
        dataset: Dataset,
        collate: RoleCollate,
        data_identity: dict[str, Any],
        spec: StoreSpec,
        *,
        augmented: bool,
        batch_size: int,
        device: torch.device,
        num_workers: int = 0,
        label: str = "",
        check_stop: Callable[[], None] = keep_going,
    ) -> None:
        self.teacher = teacher
        self.dataset = dataset
        self.collate = collate
        self.spec = spec
        self.key, self.identity = store_key(teacher, data_identity, spec, augmented)
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers
        self.label = label
        self.check_stop = check_stop

    def output_shapes(self) -> dict[str, Any]:
        example = self.teacher.example_batch(2)
        was_training = self.teacher.training
        self.teacher.eval()
        with torch.no_grad():
            inputs = {k: v.to(self.device) for k, v in example.items()}
            out = teacher_outputs(self.teacher, inputs, self.spec.features)
        self.teacher.train(was_training)
        classes = out.logits.shape[-1] if out.logits is not None else None
        features = [tuple(out.features[f.name].shape[1:]) for f in self.spec.features]
        return {"embed": out.embedding.shape[-1], "classes": classes, "features": features}

    def array_specs(
        self, count: int, shapes: dict[str, Any]
    ) -> dict[str, tuple[tuple[int, ...], Any]]:
        k, dtype = self.spec.views, DTYPES[self.spec.dtype]
        specs: dict[str, tuple[tuple[int, ...], Any]] = {
            "present": ((count, k), np.uint8),
            "embedding": ((count, k, shapes["embed"]), dtype),
        }
        classes = shapes["classes"]
        if classes is not None:
            topk = self.spec.logits_topk
            if topk is not None and topk < classes:
                specs["topk_values"] = ((count, k, topk), dtype)
                specs["topk_index"] = ((count, k, topk), np.int32)
            else:
                specs["logits"] = ((count, k, classes), dtype)
        for i, shape in enumerate(shapes["features"]):
            specs[f"feature.{i}"] = ((count, k, *shape), dtype)
        return specs

    def build(self, folder: Path, group: Collective | None = None) -> float:
        """Write the entry at `folder` (resuming a killed build); returns the seconds spent.

        With a process group every process calls this: each fills every world-th chunk of the
        same memory-mapped arrays, then global rank 0 writes the index and renames the entry."""
        group = group or Collective()
        started = time.perf_counter()
        ids = sample_ids(self.dataset)
        if not ids:
            raise DataError("teacher store: the split has no samples")
        shapes = self.output_shapes()
        specs = self.array_specs(len(ids), shapes)
        total_bytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in specs.values())
        features = sum(
            int(np.prod(s)) * np.dtype(d).itemsize
            for name, (s, d) in specs.items()
            if name.startswith("feature.")
        )
        if self.spec.max_gb is not None and total_bytes > self.spec.max_gb * 1e9:
            detail = f", {features / 1e9:.2f} GB of it teacher features" if features else ""
            raise ConfigError(
                f"distill.store.max_gb: the teacher store would take {total_bytes / 1e9:.2f} GB"
                f"{detail} (> {self.spec.max_gb} GB); raise distill.store.max_gb, store fewer "
                "views or a smaller dtype (distill.store.dtype=float16), or pick smaller layers"
            )
        hashes = check_unique(ids)  # before the long part: a repeated id fails at once
        partial = folder.with_name(folder.name + ".partial")
        layout = {
            "identity": self.identity,
            "count": len(ids),
            "views": self.spec.views,
            "chunk_size": self.spec.chunk_size,
        }
        if group.rank == 0:  # prepares (or resumes) the arrays every process writes into
            arrays = self.open_partial(partial, layout, specs, total_bytes)
        group.barrier("teacher-store-arrays")
        if group.rank != 0:
            arrays = {name: np.load(partial / f"{name}.npy", mmap_mode="r+") for name in specs}
        chunks = list(range(0, len(ids), self.spec.chunk_size))
        mine = [c for i, c in enumerate(chunks) if i % group.world == group.rank]
        markers = partial / "chunks"
        todo = [c for c in mine if not self.chunk_done(markers, arrays, c)]
        if group.rank == 0:
            log.info(
                "teacher store%s: %d samples x %d views, %.1f MB (%.1f MB of teacher features), "
                "in %s (%d processes; %d of %d chunks left)",
                self.label,
                len(ids),
                self.spec.views,
                total_bytes / 1e6,
                features / 1e6,
                folder,
                group.world,
                len(todo),
                len(mine),
            )
        self.fill(markers, arrays, todo, ids, progress=group.rank == 0)
        for array in arrays.values():
            array.flush()
        del arrays
        group.barrier("teacher-store-filled")
        if group.rank == 0:
            missing = [c for c in chunks if not (partial / "chunks" / f"{c}.done").is_file()]
            if missing:
                raise CheckpointError(f"teacher store {partial}: chunks {missing} were not built")
            meta = {
                **layout,
                "dtype": self.spec.dtype,
                "num_classes": shapes["classes"],
                "features": [f.name for f in self.spec.features],
            }
            finalize(partial, folder, ids, meta, specs, hashes)
        seconds = time.perf_counter() - started
        log.info("teacher store%s: built %s in %.1f s", self.label, folder, seconds)
        return seconds

    def open_partial(
        self,
        partial: Path,
        layout: dict[str, Any],
        specs: dict[str, tuple[tuple[int, ...], Any]],
        total_bytes: int,
    ) -> dict[str, np.memmap]:
        """The arrays of an interrupted build with this layout, or new ones, preallocated
        after a free-space check (a full disk is a DiskSpaceError, never a SIGBUS later)."""
        layout_file = partial / "layout.json"
        try:
            same = json.loads(layout_file.read_text()) == json.loads(
                json.dumps(layout, sort_keys=True, default=str)
            )
        except (OSError, ValueError):
            same = False
        if not same and partial.exists():
            shutil.rmtree(partial)
        reusable = {}
        for name, (shape, dtype) in specs.items():
            try:
                if not same:
                    raise ValueError("new build")
                array = np.load(partial / f"{name}.npy", mmap_mode="r+")
                if array.shape != shape or array.dtype != np.dtype(dtype):
                    raise ValueError("other shape")
                reusable[name] = array
            except (OSError, ValueError, EOFError):
                pass
        new = {name: spec for name, spec in specs.items() if name not in reusable}
        needed = sum(int(np.prod(s)) * np.dtype(d).itemsize + 4096 for s, d in new.values())
        check_free_space(partial, needed, f"teacher store ({total_bytes:,} bytes in all)")
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "chunks").mkdir(exist_ok=True)
        if new:
            for marker in (partial / "chunks").iterdir():
                marker.unlink()  # an array is new: no chunk of it is done
        arrays = dict(reusable)
        try:
            for name, (shape, dtype) in new.items():
                path = partial / f"{name}.npy"
                arrays[name] = np.lib.format.open_memmap(path, "w+", dtype=dtype, shape=shape)
                preallocate(path, needed)
        except DiskSpaceError:
            if not reusable:  # nothing built yet: leave no file taking space behind
                del arrays
                shutil.rmtree(partial, ignore_errors=True)
            raise
        if not same:
            write_json(layout_file, layout)
        return arrays

    def repair(self, folder: Path, damage: StoreDamaged) -> float:
        """Rebuild only the chunks (and the id index) of a finished entry that fail their
        checksums, in place; returns the seconds spent."""
        started = time.perf_counter()
        meta = json.loads((folder / "meta.json").read_text())
        ids = sample_ids(self.dataset)
        self.spec = replace(self.spec, chunk_size=int(meta["chunk_size"]))  # the entry's chunks
        if len(ids) != int(meta["count"]):
            raise CheckpointError(f"teacher store {folder}: holds {meta['count']} samples")
        names = [name for name in meta["arrays"] if name not in INDEX]
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r+") for name in names}
        if damage.index:
            for name, values in id_index(check_unique(ids)).items():
                index = np.load(folder / f"{name}.npy", mmap_mode="r+")
                index[:] = values
                index.flush()
                del index
        sums = meta["checksums"]
        if damage.chunks:
            markers = folder / ".repair"
            markers.mkdir(exist_ok=True)
            self.fill(markers, arrays, damage.chunks, ids)
            for array in arrays.values():
                array.flush()
            starts = chunk_starts(len(ids), self.spec.chunk_size)
            for start in damage.chunks:
                sums["chunks"][starts.index(start)] = int((markers / f"{start}.done").read_text())
            shutil.rmtree(markers)
        del arrays
        index = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in INDEX}
        sums["index"] = crc(index)
        del index
        write_json(folder / "meta.json", meta)
        seconds = time.perf_counter() - started
        log.info(
            "teacher store%s: rebuilt %d chunk(s)%s of %s in %.1f s",
            self.label,
            len(damage.chunks),
            " and the id index" if damage.index else "",
            folder,
            seconds,
        )
        return seconds

    def chunk_rows(self, start: int, count: int) -> slice:
        return slice(start, min(start + self.spec.chunk_size, count))

    def chunk_done(self, markers: Path, arrays: dict[str, np.memmap], start: int) -> bool:
        marker = markers / f"{start}.done"
        if not marker.is_file():
            return False
        rows = self.chunk_rows(start, len(arrays["present"]))
        if marker.read_text().strip() == str(crc(arrays, rows)):
            return True
        log.warning("teacher store: chunk at row %d of %s is damaged; redoing it", start, markers)
        return False

    @torch.no_grad()
    def fill(
        self,
        markers: Path,
        arrays: dict[str, np.memmap],
        starts: list[int],
        ids: list[str],
        progress: bool = True,
    ) -> None:
        """Run the teacher over the chunks `starts`; mark each done (its checksum in
        `markers`/START.done) once flushed."""
        k, size, count = self.spec.views, self.batch_size, len(ids)
        batches: list[list[tuple[int, int]]] = []
        owner: list[int] = []  # the chunk each batch belongs to
        for start in starts:
            arrays["present"][self.chunk_rows(start, count)] = 0  # a redone chunk starts empty
            rows = range(*self.chunk_rows(start, count).indices(count))
            for view in range(k):
                for first in range(0, len(rows), size):
                    batches.append([(i, view) for i in rows[first : first + size]])
                    owner.append(start)
        left = {start: owner.count(start) for start in starts}
        loader = DataLoader(
            ViewedDataset(self.dataset),
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )
        row_of = {sample_id: row for row, sample_id in enumerate(ids)}
        self.teacher.eval()
        desc = f"teacher store{self.label}"
        pairs = zip(owner, loader, strict=True)
        warned: set[str] = set()
        for start, batch in tqdm(pairs, total=len(batches), desc=desc, disable=not progress):
            self.check_stop()
            for name, reason in batch.get("skipped_ids", []):
                if name not in warned:
                    warned.add(name)
                    log.warning("teacher store%s: skipped sample %s: %s", self.label, name, reason)
            if batch["ids"]:
                inputs = {n: t.to(self.device) for n, t in batch["inputs"]["teacher"].items()}
                out = teacher_outputs(self.teacher, inputs, self.spec.features)
                rows = np.array([row_of[i] for i in batch["ids"]])
                views = np.array(batch.get("views", [0] * len(rows)))
                arrays["present"][rows, views] = 1
                arrays["embedding"][rows, views] = encode(out.embedding, self.spec.dtype)
                if out.logits is not None and "logits" in arrays:
                    arrays["logits"][rows, views] = encode(out.logits, self.spec.dtype)
                elif out.logits is not None:
                    top = out.logits.float().topk(self.spec.logits_topk, dim=-1)
                    arrays["topk_values"][rows, views] = encode(top.values, self.spec.dtype)
                    arrays["topk_index"][rows, views] = top.indices.cpu().numpy()
                for i, target in enumerate(self.spec.features):
                    values = encode(out.features[target.name], self.spec.dtype)
                    arrays[f"feature.{i}"][rows, views] = values
            left[start] -= 1
            if left[start] == 0:
                chunk = self.chunk_rows(start, count)
                for array in arrays.values():
                    array.flush()
                (markers / f"{start}.done").write_text(str(crc(arrays, chunk)))


def finalize(
    partial: Path,
    folder: Path,
    ids: list[str],
    meta: dict[str, Any],
    specs: dict[str, tuple[tuple[int, ...], Any]],
    hashes: np.ndarray | None = None,
) -> None:
    """Write the id index and meta.json into a filled `partial` folder and rename it to
    `folder` (replacing a damaged entry there). `hashes`: the ids' checked hashes, if known."""
    hashes = check_unique(ids) if hashes is None else hashes
    index = id_index(hashes)
    for name, array in index.items():
        np.save(partial / f"{name}.npy", array)
    (partial / "ids.txt").write_text("\n".join(ids) + "\n")
    rows = {name: np.load(partial / f"{name}.npy", mmap_mode="r") for name in specs}
    chunk_size = int(meta["chunk_size"])
    sums = []
    for start in chunk_starts(len(ids), chunk_size):
        marker = partial / "chunks" / f"{start}.done"  # the checksum the build recorded
        recorded = marker.read_text().strip() if marker.is_file() else ""
        sums.append(
            int(recorded) if recorded.isdigit() else crc(rows, slice(start, start + chunk_size))
        )
    del rows
    specs = {**specs, "id_hash": ((len(ids),), np.uint64), "row": ((len(ids),), np.int64)}
    meta = {
        **meta,
        "checksums": {"chunks": sums, "index": crc(index)},
        "count": len(ids),
        "arrays": {
            name: {"shape": list(shape), "dtype": str(np.dtype(dtype))}
            for name, (shape, dtype) in specs.items()
        },
    }
    write_json(partial / "meta.json", meta)
    shutil.rmtree(partial / "chunks", ignore_errors=True)
    if folder.exists():  # a damaged entry being replaced
        shutil.rmtree(folder)
    partial.rename(folder)


def preallocate(path: Path, needed: int) -> None:
    """Reserve the blocks of a new array file, so that writing into its memory map can never
    hit a full disk (a SIGBUS); DiskSpaceError when the disk cannot hold it."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                path.unlink()
                raise DiskSpaceError(
                    f"teacher store {path}: not enough disk space: {needed:,} bytes needed; "
                    f"free some space or set distill.cache_dir to another disk"
                ) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
