"""The teacher store: the frozen teacher's outputs for K augmented views of every sample of a
split, computed once and read back memory-mapped by every later epoch, run and seed.

View `v` of sample `i` is the teacher's output on the input augmented inside
`replay_scope(store seed, id, v)` (mmkd.replay), so the data loader can replay exactly that view
for a student of the same modality. With no augmentation of the teacher's input every view is
the same and the store keeps one (K=1: the old teacher cache).

An entry lives in `ROOT/<key>/`; the key hashes everything that defines its contents: the
teacher's weights, its preprocessing (augmentation settings included) and the versions of the
libraries that implement it, the split's data and sample ids, K, the augmentation seed and the
stored precision. Layout, rows in the split's sample order:

    meta.json        identity, count, views, array specs
    ids.txt          the sample ids, one per line (for people; not read on open)
    id_hash.npy      uint64 hashes of the ids, sorted; row.npy: the row of each hash
    present.npy      uint8 (N, K): 0 where a sample could not be read (data.on_error=skip)
    embedding.npy    (N, K, D)           float32 | float16 | bfloat16 (stored as int16 bits)
    logits.npy       (N, K, C)           or, with logits_topk=k,
    topk_values.npy  (N, K, k) + topk_index.npy (N, K, k) int32
    feature.I.npy    (N, K, *shape)      the I-th teacher feature the loss terms read (a layer's
                                         output, or the reduced form a term uses, e.g. an
                                         attention map), in the same dtype; meta.json names them

It is built in `ROOT/<key>.partial/`, chunk by chunk (`chunk_size` samples x K views); a chunk
is marked done, with a checksum, only after its rows are flushed, so a killed build resumes at
the first chunk not done. The finished folder is renamed into place: readers see a complete
entry or none.

Integrity: meta.json keeps a CRC-32 of every chunk (its rows of every per-row array) and of the
id index (id_hash.npy + row.npy). Opening checks counts, shapes and dtypes, then every checksum,
before any row is used. A chunk that fails is rebuilt alone (the teacher runs on its samples
only); a damaged index is rewritten from the sample ids; anything else is rebuilt whole. Never
read silently.

Concurrency and disk space: one builder per entry, by a file lock (`ROOT/<key>.lock`, filelock;
the kernel releases it when its process dies, so the next run takes over a dead builder's
partial build and resumes it). A second run waits for the lock, then finds the finished entry.
Before writing, the free space is checked against the entry's size and the arrays are
preallocated (`posix_fallocate`), so a full disk is one line naming the path and the bytes
needed, never a SIGBUS from a sparse memory map. `mmkd store list|gc ROOT` shows and removes
leftover partial builds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mmkd.adapters import Adapter, Preprocessor
from mmkd.data.base import sample_ids
from mmkd.data.module import RoleCollate, ViewedDataset
from mmkd.errors import CheckpointError, ConfigError, DataError, DiskSpaceError
from mmkd.io import check_free_space, write_json
from mmkd.losses import FeatureTarget

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: per-chunk checksums in meta.json
INDEX = ("id_hash", "row")  # the id index: one row per sample, no view axis
LOCK_WAIT_LOG_S = 5.0  # wait this long for another builder's lock before saying so
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}
# libraries whose code defines a preprocessed (augmented) input
LIBRARIES = ("torch", "torchvision", "torchaudio", "timm", "transformers", "numpy", "pillow")


@dataclass(frozen=True)
class StoreSpec:
    """What to store: K views, seeded by `seed`, in `dtype`, optionally only the top-k logits."""

    views: int = 1
    seed: int = 0
    dtype: str = "float32"
    logits_topk: int | None = None
    chunk_size: int = 4096
    max_gb: float | None = None
    features: tuple[FeatureTarget, ...] = ()  # teacher layers the loss terms read


@dataclass(frozen=True)
class Collective:
    """The processes that build a store together (one process by default). Lightning runs
    pass their strategy's barrier and boolean reduction."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[str], None] = lambda name: None
    any: Callable[[bool], bool] = lambda flag: flag


@dataclass
class TeacherTargets:
    """What the loss terms get from the teacher for a batch."""

    embedding: Tensor
    logits: Tensor | None
    features: dict[str, Tensor] = field(default_factory=dict)  # by FeatureTarget.name


def teacher_outputs(
    teacher: Adapter, inputs: dict[str, Tensor], features: tuple[FeatureTarget, ...] | list
) -> TeacherTargets:
    """The teacher's outputs on a batch of its input, with the features the terms read."""
    out = teacher(inputs, layers=list(dict.fromkeys(f.layer for f in features)))
    return TeacherTargets(
        out.embedding, out.logits, {f.name: f.apply(out.layers[f.layer]) for f in features}
    )


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def check_unique(ids: list[str]) -> np.ndarray:
    """The ids' hashes; DataError when an id repeats or two ids share a 64-bit hash."""
    hashes = id_hashes(ids)
    ordered = np.sort(hashes)
    clash = np.flatnonzero(ordered[1:] == ordered[:-1])
    if clash.size:
        same = [i for i, h in zip(ids, hashes, strict=True) if h == ordered[clash[0]]][:2]
        what = "repeats" if same[0] == same[-1] else f"and {same[1]!r} share a 64-bit hash"
        raise DataError(f"teacher store: sample id {same[0]!r} {what}; ids must be unique")
    return hashes


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


def id_index(hashes: np.ndarray) -> dict[str, np.ndarray]:
    """The sorted id hashes and the row of each: how `TeacherStore.rows` finds a sample."""
    order = np.argsort(hashes, kind="stable")
    return {"id_hash": hashes[order], "row": order.astype(np.int64)}


def id_hashes(ids: list[str]) -> np.ndarray:
    """64-bit hashes of sample ids (blake2b): lookups need no Python object per stored row."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
            for i in ids
        ),
        dtype=np.uint64,
        count=len(ids),
    )


def crc(arrays: dict[str, np.ndarray], rows: slice = slice(None)) -> int:
    """CRC-32 of `rows` of every array (by name order): zlib's runs at several GB/s."""
    value = 0
    for name in sorted(arrays):
        block = np.ascontiguousarray(arrays[name][rows])
        value = zlib.crc32(memoryview(block).cast("B"), value)
    return value


def chunk_starts(count: int, chunk_size: int) -> list[int]:
    return list(range(0, count, chunk_size))


def per_row(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays with one entry per (sample, view): everything but the id index."""
    return {name: array for name, array in arrays.items() if name not in INDEX}


def data_content(dataset: Dataset) -> dict[str, Any]:
    """The content identity of the files a split's samples are read from: size and
    modification time (ns) of each, as make uses them, hashed with the sample ids. A file
    replaced in place gets a new mtime, so the store key changes, at the cost of one stat per
    file (a content hash would read the whole data set at every start). Datasets that cannot
    name their files (generated, in-memory) give None."""
    base, indices = dataset, None
    while isinstance(base, Subset):
        inner = list(base.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        base = base.dataset
    cached = getattr(base, "content_key", None)  # a decode-cache entry: its key is the identity
    if cached is not None:
        chosen = "all" if indices is None else ",".join(map(str, indices))
        return {"decoded": cached, "indices": hashlib.sha256(chosen.encode()).hexdigest()}
    files = getattr(base, "sample_files", None)
    if files is None:
        return {"files": None}
    stats: dict[str, str] = {}
    lines = []
    for index in range(len(base)) if indices is None else indices:  # type: ignore[arg-type]
        for path in files(index):
            if path not in stats:
                try:
                    st = os.stat(path)
                    stats[path] = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    stats[path] = "missing"
            lines.append(f"{index}\t{path}\t{stats[path]}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"files": len(lines), "files_sha256": digest}


def store_key(
    teacher: Adapter, data_identity: dict[str, Any], spec: StoreSpec, augmented: bool
) -> tuple[str, dict[str, Any]]:
    """(key, identity): the key changes whenever anything that defines the contents does."""
    identity = {
        "format": FORMAT_VERSION,
        "teacher_weights": weights_digest(teacher),
        "preprocessing": teacher.make_preprocessor().identity(),
        "augmented": augmented,
        "libraries": library_versions() if augmented else {},
        "data": data_identity,
        "views": spec.views,
        "seed": spec.seed if augmented else None,
        "dtype": spec.dtype,
        "logits_topk": spec.logits_topk,
    }
    if spec.features:  # absent when empty: stores of outputs only keep their keys
        identity["features"] = [f.name for f in spec.features]
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24], identity


# --------------------------------------------------------------------------- encoding


def encode(values: Tensor, dtype: str) -> np.ndarray:
    values = values.detach().float().cpu()
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    return values.numpy().astype(DTYPES[dtype])


def decode(array: np.ndarray, dtype: str) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dtype == "bfloat16":
        return tensor.view(torch.bfloat16).float()
    return tensor.float()


def full_logits(values: Tensor, index: Tensor, num_classes: int) -> Tensor:
    """Logits with only the stored top-k classes finite: softmax renormalises over them."""
    out = torch.full((*values.shape[:-1], num_classes), float("-inf"), dtype=values.dtype)
    return out.scatter_(-1, index.long(), values)


# --------------------------------------------------------------------------- reading


class StoreDamaged(CheckpointError):
    """Chunks of an entry (or its id index) fail their checksums: they can be rebuilt alone."""

    def __init__(self, folder: Path, chunks: list[int], index: bool) -> None:
        what = []
        if chunks:
            what.append(f"chunk(s) at row {', '.join(map(str, chunks[:8]))}")
        if index:
            what.append("the id index")
        super().__init__(f"teacher store {folder}: {' and '.join(what)} fail their checksum")
        self.chunks = chunks
        self.index = index


class TeacherStore:
    """An open store entry: memory-mapped arrays, looked up by (sample id, view)."""

    def __init__(self, folder: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.folder = folder
        self.meta = meta
        self.arrays = arrays
        self.views = int(meta["views"])
        self.dtype = meta["dtype"]

    @classmethod
    def open(cls, folder: Path, verify: bool = True) -> TeacherStore:
        """Open and check an entry (with `verify`, every chunk's checksum too); raise
        CheckpointError saying what is wrong with it (StoreDamaged: which chunks)."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            count, views, specs = int(meta["count"]), int(meta["views"]), meta["arrays"]
            chunk_size, sums = int(meta["chunk_size"]), meta["checksums"]
            chunk_sums, index_sum = sums["chunks"], sums["index"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"teacher store {folder}: unreadable index ({err})") from None
        arrays = {}
        for name, spec in specs.items():
            path = folder / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as err:
                raise CheckpointError(
                    f"teacher store {path}: unreadable or truncated ({err})"
                ) from None
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise CheckpointError(
                    f"teacher store {path}: shape {list(array.shape)} {array.dtype}, expected "
                    f"{spec['shape']} {spec['dtype']}"
                )
            per_view = name not in ("id_hash", "row")
            if array.shape[0] != count or (per_view and array.shape[1] != views):
                raise CheckpointError(
                    f"teacher store {path}: shape {list(array.shape)}, expected {count} rows"
                    + (f" x {views} views" if per_view else "")
                )
            arrays[name] = array
        missing = {"id_hash", "row", "present", "embedding"} - set(arrays)
        if missing:
            raise CheckpointError(f"teacher store {folder}: missing {', '.join(sorted(missing))}")
        starts = chunk_starts(count, chunk_size)
        if len(chunk_sums) != len(starts):
            raise CheckpointError(f"teacher store {folder}: {len(chunk_sums)} chunk checksums")
        if verify:
            rows = per_row(arrays)
            bad = [
                start
                for start, expected in zip(starts, chunk_sums, strict=True)
                if crc(rows, slice(start, start + chunk_size)) != expected
            ]
            index = crc({n: arrays[n] for n in INDEX}) != index_sum
            if bad or index:
                raise StoreDamaged(folder, bad, index)
        return cls(folder, meta, arrays)

    def __len__(self) -> int:
        return int(self.meta["count"])

    def rows(self, ids: list[str]) -> np.ndarray:
        hashes = id_hashes(ids)
        sorted_hashes = self.arrays["id_hash"]
        pos = np.searchsorted(sorted_hashes, hashes)
        pos = np.minimum(pos, len(sorted_hashes) - 1)
        found = sorted_hashes[pos] == hashes
        if not found.all():
            missing = ids[int(np.argmin(found))]
            raise CheckpointError(
                f"teacher store {self.folder}: sample {missing!r} is not in it "
                "(the training data changed?)"
            )
        return np.asarray(self.arrays["row"][pos])

    def lookup(
        self, ids: list[str], views: list[int] | None = None, device: torch.device | str = "cpu"
    ) -> TeacherTargets:
        """The stored outputs for these samples and views (view 0 when `views` is None)."""
        rows = self.rows(ids)
        view = np.zeros(len(ids), dtype=np.int64) if views is None else np.asarray(views)
        if views is not None and (view.min(initial=0) < 0 or view.max(initial=0) >= self.views):
            raise CheckpointError(
                f"teacher store {self.folder}: holds {self.views} views, asked for view "
                f"{int(view.max())}"
            )
        order = np.argsort(rows * self.views + view)  # sorted reads are faster on a memory map
        r, v = rows[order], view[order]
        if not self.arrays["present"][r, v].all():
            bad = ids[int(order[np.argmin(self.arrays["present"][r, v])])]
            raise CheckpointError(
                f"teacher store {self.folder}: sample {bad!r} could not be read when the store "
                "was built (data.on_error=skip), but it is read now"
            )
        inverse = np.argsort(order)

        def pick(name: str) -> Tensor:
            return decode(self.arrays[name][r, v][inverse], self.dtype)

        embedding = pick("embedding")
        logits = None
        if "logits" in self.arrays:
            logits = pick("logits")
        elif "topk_values" in self.arrays:
            index = torch.from_numpy(np.asarray(self.arrays["topk_index"][r, v][inverse]))
            logits = full_logits(pick("topk_values"), index, int(self.meta["num_classes"]))
        features = {
            name: pick(f"feature.{i}").to(device, non_blocking=True)
            for i, name in enumerate(self.meta.get("features", []))
        }
        return TeacherTargets(
            embedding.to(device, non_blocking=True),
            None if logits is None else logits.to(device, non_blocking=True),
            features,
        )


# --------------------------------------------------------------------------- writing


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


class StoreBuilder:
    """Runs the teacher over a split's K views and writes the entry, resumably."""

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


def open_or_build(
    root: Path, builder: StoreBuilder, group: Collective | None = None
) -> tuple[Path, float | None]:
    """Make sure the entry for this teacher and data exists and passes its checksums (every
    process of `group` calls this); returns (folder, build seconds, or None when it was there).

    One builder at a time: global rank 0 holds `ROOT/<key>.lock` while its group builds or
    repairs; another run waits for it, then finds the finished entry."""
    group = group or Collective()
    folder = root / builder.key
    problem = entry_problem(folder)
    if not group.any(problem is not None):  # one decision for all processes
        log.info("teacher store%s: hit %s", builder.label, folder)
        return folder, None
    lock, done = None, False
    if group.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        lock = acquire(root / f"{builder.key}.lock", folder)
    try:
        if group.rank == 0:  # another run may have built or repaired it while this one waited
            problem = entry_problem(folder)
        if not group.any(group.rank == 0 and problem is not None):
            log.info("teacher store%s: built by another run: %s", builder.label, folder)
            done = True
            return folder, None
        repairable = isinstance(problem, StoreDamaged)
        repair = group.any(group.rank == 0 and repairable)
        if group.rank == 0 and not isinstance(problem, Missing):
            log.warning("%s; %s", problem, "rebuilding those" if repair else "rebuilding it")
        # the pass over the data must not move the training RNG: a run draws the same random
        # numbers (dropout, shuffling seeds) with the store as without it
        cuda = [builder.device] if builder.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), disk_full_is_one_line(folder):
            if repair:
                seconds = 0.0
                if group.rank == 0:
                    assert isinstance(problem, StoreDamaged)
                    seconds = builder.repair(folder, problem)
                group.barrier("teacher-store-repaired")
            else:
                seconds = builder.build(folder, group)
        group.barrier("teacher-store-ready")
        done = True
        return folder, seconds
    finally:
        if lock is not None:
            lock.release()
            if done:  # safe: whoever waited on it re-checks and finds the finished entry
                Path(lock.lock_file).unlink(missing_ok=True)


class Missing(CheckpointError):
    """No entry there yet."""


def entry_problem(folder: Path) -> CheckpointError | None:
    """Why the entry at `folder` cannot be read as it is (Missing, StoreDamaged, other), or
    None when it opens and passes every checksum."""
    if not folder.exists():
        return Missing(f"teacher store {folder}: missing")
    try:
        TeacherStore.open(folder)
    except CheckpointError as err:
        return err
    return None


def acquire(path: Path, folder: Path) -> FileLock:
    """The builder's lock for `folder`, waiting (with one line saying so) while another
    process holds it. The kernel drops a dead process's lock, so its successor takes over."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=LOCK_WAIT_LOG_S)
    except Timeout:
        log.info("teacher store: waiting for another process building %s (lock %s)", folder, path)
        lock.acquire()
    return lock


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


class disk_full_is_one_line:
    """Turns ENOSPC while building the entry at `folder` into one DiskSpaceError line; the
    partial build stays, resumable (`mmkd store gc ROOT` removes it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, trace: Any) -> None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskSpaceError(
                f"teacher store {self.folder}: the disk filled ({err.strerror}); the partial "
                f"build is kept and resumes next time, `mmkd store gc {self.folder.parent}` "
                "removes it"
            ) from None
