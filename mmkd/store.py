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
entry or none. Opening checks counts, shapes and dtypes; a damaged entry is reported and
rebuilt, never read silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmkd.adapters import Adapter, Preprocessor
from mmkd.data.base import sample_ids
from mmkd.data.module import RoleCollate, ViewedDataset
from mmkd.errors import CheckpointError, ConfigError, DataError
from mmkd.io import write_json
from mmkd.losses import FeatureTarget

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
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
    order = np.argsort(hashes, kind="stable")
    np.save(partial / "id_hash.npy", hashes[order])
    np.save(partial / "row.npy", order.astype(np.int64))
    (partial / "ids.txt").write_text("\n".join(ids) + "\n")
    specs = {**specs, "id_hash": ((len(ids),), np.uint64), "row": ((len(ids),), np.int64)}
    meta = {
        **meta,
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


class TeacherStore:
    """An open store entry: memory-mapped arrays, looked up by (sample id, view)."""

    def __init__(self, folder: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.folder = folder
        self.meta = meta
        self.arrays = arrays
        self.views = int(meta["views"])
        self.dtype = meta["dtype"]

    @classmethod
    def open(cls, folder: Path) -> TeacherStore:
        """Open and check an entry; raise CheckpointError saying what is wrong with it."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            count, views, specs = int(meta["count"]), int(meta["views"]), meta["arrays"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"teacher store {folder}: unreadable index ({err})") from None
        arrays = {}
        for name, spec in specs.items():
            path = folder / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
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
            arrays = self.open_partial(partial, layout, specs)
        group.barrier("teacher-store-arrays")
        if group.rank != 0:
            arrays = {name: np.load(partial / f"{name}.npy", mmap_mode="r+") for name in specs}
        chunks = list(range(0, len(ids), self.spec.chunk_size))
        mine = [c for i, c in enumerate(chunks) if i % group.world == group.rank]
        todo = [c for c in mine if not self.chunk_done(partial, arrays, c)]
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
        self.fill(partial, arrays, todo, ids, progress=group.rank == 0)
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
        self, partial: Path, layout: dict[str, Any], specs: dict[str, tuple[tuple[int, ...], Any]]
    ) -> dict[str, np.memmap]:
        """The arrays of an interrupted build with this layout, or new ones."""
        layout_file = partial / "layout.json"
        try:
            same = json.loads(layout_file.read_text()) == json.loads(
                json.dumps(layout, sort_keys=True, default=str)
            )
        except (OSError, ValueError):
            same = False
        if not same and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "chunks").mkdir(exist_ok=True)
        arrays = {}
        for name, (shape, dtype) in specs.items():
            path = partial / f"{name}.npy"
            try:
                if not same:
                    raise ValueError("new build")
                array = np.load(path, mmap_mode="r+")
                if array.shape != shape or array.dtype != np.dtype(dtype):
                    raise ValueError("other shape")
            except (OSError, ValueError):
                for marker in (partial / "chunks").iterdir():
                    marker.unlink()  # an array is new: no chunk of it is done
                array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            arrays[name] = array
        if not same:
            write_json(layout_file, layout)
        return arrays

    def chunk_rows(self, start: int, count: int) -> slice:
        return slice(start, min(start + self.spec.chunk_size, count))

    @staticmethod
    def checksum(arrays: dict[str, np.memmap], rows: slice) -> str:
        digest = hashlib.sha256()
        for name in sorted(arrays):
            digest.update(np.ascontiguousarray(arrays[name][rows]).tobytes())
        return digest.hexdigest()

    def chunk_done(self, partial: Path, arrays: dict[str, np.memmap], start: int) -> bool:
        marker = partial / "chunks" / f"{start}.done"
        if not marker.is_file():
            return False
        rows = self.chunk_rows(start, len(arrays["present"]))
        if marker.read_text().strip() == self.checksum(arrays, rows):
            return True
        log.warning("teacher store: chunk at row %d of %s is damaged; redoing it", start, partial)
        return False

    @torch.no_grad()
    def fill(
        self,
        partial: Path,
        arrays: dict[str, np.memmap],
        starts: list[int],
        ids: list[str],
        progress: bool = True,
    ) -> None:
        """Run the teacher over the chunks not done; mark each done once flushed."""
        k, size, count = self.spec.views, self.batch_size, len(ids)
        batches: list[list[tuple[int, int]]] = []
        owner: list[int] = []  # the chunk each batch belongs to
        for start in starts:
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
        for start, batch in tqdm(pairs, total=len(batches), desc=desc, disable=not progress):
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
                marker = partial / "chunks" / f"{start}.done"
                marker.write_text(self.checksum(arrays, chunk))


def open_or_build(
    root: Path, builder: StoreBuilder, group: Collective | None = None
) -> tuple[Path, float | None]:
    """Make sure the entry for this teacher and data exists (every process of `group` calls
    this); returns (folder, build seconds, or None when it was there)."""
    group = group or Collective()
    folder = root / builder.key
    problem = "missing"
    if folder.exists():
        try:
            TeacherStore.open(folder)
            problem = ""
        except CheckpointError as err:
            problem = str(err)
    if not group.any(bool(problem)):  # one decision for all processes
        log.info("teacher store%s: hit %s", builder.label, folder)
        return folder, None
    if problem != "missing" and group.rank == 0:
        log.warning("%s; rebuilding it", problem)
    # the pass over the data must not move the training RNG: a run draws the same random
    # numbers (dropout, shuffling seeds) with the store as without it
    cuda = [builder.device] if builder.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        seconds = builder.build(folder, group)
    group.barrier("teacher-store-ready")
    return folder, seconds
