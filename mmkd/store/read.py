"""Reading a finished store entry: open it (counts, shapes, dtypes and checksums checked before
any row is used) and look rows up by (sample id, view)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmkd.errors import CheckpointError
from mmkd.store.format import INDEX, chunk_starts, crc, decode, full_logits, id_hashes, per_row
from mmkd.store.targets import TeacherTargets


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
