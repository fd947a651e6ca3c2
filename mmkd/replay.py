"""Replayable augmentation: view `v` of sample `i` is the same tensor in any process, worker or
later run.

Random training transforms (timm / torchvision image transforms, torchaudio's SpecAugment,
the audio time shift and gain) draw from the global generators of torch, numpy and Python's
`random`. `replay_scope` seeds all three from (augmentation seed, sample id, view index) and
restores their previous states on exit, so a transform run inside it is a pure function of
those three values and the global random streams of training are left exactly where they were.

Which view a sample gets in an epoch is a `ViewPolicy`: without a teacher store, a new view
every epoch (view = epoch, seeded by run.seed); with a store of K views, view `epoch mod K`
(cycle) or a seeded draw per sample and epoch (random), seeded by the store's seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


def view_seed(seed: int, sample_id: str, view: int) -> int:
    """A 64-bit seed from (augmentation seed, sample id, view)."""
    key = f"{seed}\x1f{sample_id}\x1f{view}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


@contextlib.contextmanager
def replay_scope(seed: int, sample_id: str, view: int) -> Iterator[None]:
    """Seed torch (CPU), numpy and `random` for this view; restore their states afterwards."""
    value = view_seed(seed, sample_id, view)
    torch_state = torch.random.default_generator.get_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    torch.random.default_generator.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    try:
        yield
    finally:
        torch.random.default_generator.set_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@dataclass(frozen=True)
class ViewPolicy:
    """Which augmented view each training sample gets in each epoch."""

    seed: int  # augmentation seed (the store's, or run.seed without a store)
    views: int | None = None  # K stored views; None: view = epoch (a new view every epoch)
    order: str = "cycle"  # cycle | random (with K views)
    draw_seed: int = 0  # seeds the random order (run.seed: each run draws its own sequence)

    def views_for(self, epoch: int, size: int) -> np.ndarray:
        """The view index of each of `size` samples (by position in the dataset) in `epoch`."""
        if self.views is None:
            return np.full(size, epoch, dtype=np.int64)
        if self.order == "cycle":
            return np.full(size, epoch % self.views, dtype=np.int64)
        rng = np.random.default_rng([self.draw_seed, epoch])
        return rng.integers(self.views, size=size, dtype=np.int64)
