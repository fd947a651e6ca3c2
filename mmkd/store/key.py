"""The key of a store entry: everything that defines its contents (the teacher's weights and
preprocessing, the libraries behind an augmentation, the split's data, K, the seed, the dtype),
hashed. Any change to one of them is a new entry, never a stale read."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from mmkd.adapters import Adapter
from mmkd.losses import FeatureTarget
from mmkd.store.format import FORMAT_VERSION

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


def data_content(dataset: Dataset) -> dict[str, Any]:
    """The content identity of the files a split's samples are read from: size and
    modification time (ns) of each, as make uses them, hashed with the sample ids. A file
    replaced in place gets a new mtime, so the store key changes, at the cost of one stat per
    file (a content hash would read the whole data set at every start). A dataset may name a
    file's identity itself (`file_identity(path)`: a manifest gives the rows it read, so
    rewriting the same rows keeps the key). Datasets that cannot name their files (generated,
    in-memory) give None."""
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
    known = getattr(base, "file_identity", None)  # e.g. a manifest: the rows read from it
    stats: dict[str, str] = {}
    lines = []
    for index in range(len(base)) if indices is None else indices:  # type: ignore[arg-type]
        for path in files(index):
            if path not in stats:
                identity = known(path) if known is not None else None
                stats[path] = identity if identity is not None else _stat_identity(path)
            lines.append(f"{index}\t{path}\t{stats[path]}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"files": len(lines), "files_sha256": digest}


def _stat_identity(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


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
