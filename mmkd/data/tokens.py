"""Tokenise every text of a split once, with one batched call of the fast tokenizer, and keep
the token ids on disk.

A token cache file is keyed like the teacher store: the content of the texts (a digest of every
text in order), the tokenizer's identity (a digest of its full serialisation, for a fast
tokenizer, and the `tokenizers` version) and max_length. A changed text, tokenizer or length
makes a new key: the cache is never stale. Texts the cache does not hold (augmented views) are
tokenised when they are loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

log = logging.getLogger(__name__)


def dataset_texts(dataset: Dataset) -> list[str] | None:
    """The texts of a split without loading its samples, through Subsets, when the dataset can
    list them (`texts()`); None otherwise."""
    if isinstance(dataset, Subset):
        inner = dataset_texts(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    texts = getattr(dataset, "texts", None)
    return None if texts is None else texts()


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What fixes a tokenizer's output: its serialisation (fast tokenizers) or its class, name
    and vocabulary, plus the library version."""
    import tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # less the truncation / padding state each call sets
        saved = {
            k: v
            for k, v in json.loads(backend.to_str()).items()
            if k not in ("truncation", "padding")
        }
        content = json.dumps(saved, sort_keys=True)
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "sha256": hashlib.sha256(content.encode()).hexdigest(),
        "tokenizers": tokenizers.__version__,
    }


def cache_key(texts: Sequence[str], tokenizer: Any, max_length: int) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    identity = {
        "texts": digest.hexdigest(),
        "count": len(texts),
        "tokenizer": tokenizer_identity(tokenizer),
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def tokenize_all(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of every text (truncated to max_length), by one batched call."""
    if not texts:
        return []
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def load_or_tokenize(
    tokenizer: Any, texts: Sequence[str], max_length: int, cache_dir: Path | None
) -> tuple[list[np.ndarray], bool]:
    """(token ids per text, whether the disk cache held them). Without cache_dir: tokenised
    in memory only."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"tokens-{cache_key(texts, tokenizer, max_length)}.npz"
        if path.is_file():
            with np.load(path) as saved:
                ids, offsets = saved["ids"], saved["offsets"]
            if len(offsets) == len(texts) + 1:
                return [ids[offsets[i] : offsets[i + 1]] for i in range(len(texts))], True
            log.warning(
                "token cache %s holds %d texts, not %d: rebuilt", path, len(offsets) - 1, len(texts)
            )
    encoded = tokenize_all(tokenizer, texts, max_length)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in encoded], out=offsets[1:])
    flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int32, count=int(offsets[-1]))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=flat, offsets=offsets)
        tmp.replace(path)  # atomic: a reader sees the whole file or none
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))], False
