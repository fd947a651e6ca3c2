"""Teacher-output cache: run the frozen teacher over the training split once, then serve its
outputs memory-mapped from disk in every later epoch (and later runs).

An entry lives in `cache_dir/<key>/` where the key hashes the teacher's identity (its weights
and its preprocessing settings) and the dataset's identity; inside, rows are addressed by sample
id (view 0: the teacher's input must be deterministic, so there is one view per sample).
Entries are written to a temporary folder and renamed into place, and checked (count, shape,
dtype) when opened; a damaged entry is reported and rebuilt, never read silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmkd.adapters import Adapter
from mmkd.errors import CheckpointError, ConfigError
from mmkd.io import atomic_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAYS = ("embedding", "logits")


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cache_key(teacher: Adapter, dataset_identity: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, identity): the key changes whenever the teacher, its preprocessing or the data do."""
    preprocessor = teacher.make_preprocessor()
    if preprocessor.randomized_in_training:
        raise ConfigError(
            "distill.cache: the teacher's training input is randomly augmented "
            f"({teacher.key}: image.augment or audio.spec_augment), so one stored output per "
            "sample would be wrong. Turn the teacher's augmentation off or distill.cache=false."
        )
    identity = {
        "format": FORMAT_VERSION,
        "teacher_weights": weights_digest(teacher),
        "preprocessing": preprocessor.identity(),
        "data": dataset_identity,
    }
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24], identity


class TeacherCache:
    """Stored teacher outputs for one (teacher, preprocessing, dataset) combination."""

    def __init__(self, folder: Path, ids: list[str], arrays: dict[str, np.ndarray]) -> None:
        self.folder = folder
        self.row = {sample_id: i for i, sample_id in enumerate(ids)}
        self.arrays = arrays

    # ---------------------------------------------------------------- reading
    @classmethod
    def open(cls, folder: Path) -> TeacherCache:
        """Open and check an entry; raise CheckpointError saying what is wrong with it."""
        meta_file = folder / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
            ids = json.loads((folder / "ids.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"teacher cache {folder}: unreadable index ({err})") from None
        if len(ids) != meta["count"] or len(set(ids)) != len(ids):
            raise CheckpointError(
                f"teacher cache {folder}: {len(ids)} ids, expected {meta['count']} distinct"
            )
        arrays = {}
        for name, spec in meta["arrays"].items():
            path = folder / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise CheckpointError(
                    f"teacher cache {path}: unreadable or truncated ({err})"
                ) from None
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise CheckpointError(
                    f"teacher cache {path}: shape {list(array.shape)} {array.dtype}, expected "
                    f"{spec['shape']} {spec['dtype']}"
                )
            arrays[name] = array
        return cls(folder, ids, arrays)

    def __len__(self) -> int:
        return len(self.row)

    def lookup(
        self, ids: Iterable[str], device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor | None]:
        """(embedding, logits) rows for these sample ids."""
        try:
            rows = np.fromiter((self.row[i] for i in ids), dtype=np.int64)
        except KeyError as err:
            raise CheckpointError(
                f"teacher cache {self.folder}: sample {err} is not in it "
                "(the training data changed?)"
            ) from None
        order = np.argsort(rows)  # sorted reads are faster on a memory map
        out = []
        for name in ARRAYS:
            if name not in self.arrays:
                out.append(None)
                continue
            picked = np.empty((len(rows), *self.arrays[name].shape[1:]), dtype=np.float32)
            picked[order] = self.arrays[name][rows[order]]
            out.append(torch.from_numpy(picked).to(device, non_blocking=True))
        return out[0], out[1]

    # ---------------------------------------------------------------- writing
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        folder: Path,
        teacher: Adapter,
        dataset: Dataset,
        collate: Any,
        identity: dict[str, Any],
        batch_size: int,
        device: torch.device,
        num_workers: int = 0,
    ) -> None:
        """Run the teacher over `dataset` once and write the entry atomically."""
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate,
        )
        ids: list[str] = []
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        teacher.eval()
        for batch in tqdm(loader, desc="teacher cache", leave=False):
            if not batch["ids"]:
                continue
            inputs = {k: v.to(device) for k, v in batch["inputs"]["teacher"].items()}
            out = teacher(inputs)
            ids.extend(batch["ids"])
            chunks["embedding"].append(out.embedding.float().cpu().numpy())
            if out.logits is not None:
                chunks["logits"].append(out.logits.float().cpu().numpy())
        if not ids:
            raise CheckpointError("teacher cache: the training split has no usable sample")
        arrays = {name: np.concatenate(parts) for name, parts in chunks.items() if parts}
        with atomic_dir(folder) as tmp:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array)
            (tmp / "ids.json").write_text(json.dumps(ids))
            meta = {
                "count": len(ids),
                "arrays": {
                    n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()
                },
                "identity": identity,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        log.info("teacher cache: stored %d samples in %s", len(ids), folder)


def open_or_build(
    root: Path,
    teacher: Adapter,
    dataset: Dataset,
    collate: Any,
    dataset_identity: dict[str, Any],
    *,
    batch_size: int,
    device: torch.device,
    build: bool,
    num_workers: int = 0,
) -> tuple[Path, bool]:
    """Make sure the entry for this teacher and data exists; returns (folder, built_now).

    Only the process with `build=True` writes; the others are expected to wait for it."""
    key, identity = cache_key(teacher, dataset_identity)
    folder = root / key
    if not build:
        return folder, False
    if folder.exists():
        try:
            TeacherCache.open(folder)
            log.info("teacher cache: hit %s", folder)
            return folder, False
        except CheckpointError as err:
            log.warning("%s; rebuilding it", err)
    # the pass over the data must not move the training RNG: a run draws the same random
    # numbers (dropout, shuffling seeds) with the cache as without it
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        TeacherCache.build(
            folder, teacher, dataset, collate, identity, batch_size, device, num_workers
        )
    return folder, True
