"""The on-disk encoding of a store entry: array dtypes, the id index (64-bit id hashes, sorted)
and the CRC-32 checksums of chunks of rows. The layout itself is described in mmkd.store."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import torch
from torch import Tensor

from mmkd.errors import DataError

FORMAT_VERSION = 3  # 3: per-chunk checksums in meta.json
INDEX = ("id_hash", "row")  # the id index: one row per sample, no view axis
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}


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
