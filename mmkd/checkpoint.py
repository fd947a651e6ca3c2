"""Checkpoint handling beyond Lightning's defaults: safe loading, RNG state, saving on signals.

Lightning already writes checkpoints atomically (an fsspec transaction: temporary file, then
move). Here checkpoints are read with `torch.load(weights_only=True)` only, a damaged file is
reported by name, the RNG state travels with the checkpoint, and SIGINT / SIGTERM save one.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mmkd.errors import CheckpointError

log = logging.getLogger(__name__)


class SafeCheckpointIO(TorchCheckpointIO):
    """Loads checkpoints with `weights_only=True`; a truncated or corrupt file raises
    CheckpointError naming it instead of a traceback from deep inside torch."""

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such checkpoint")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:  # zip / pickle / EOF errors of a damaged file
            raise CheckpointError(
                f"{path}: unreadable checkpoint ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}). It may be truncated or corrupt; delete it "
                "to start over, or restore it from a copy."
            ) from None


def rng_state() -> dict[str, Any]:
    """Every RNG the training step may draw from, as types `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the torch, numpy, random (and CUDA) generators saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointOnInterrupt(pl.Callback):
    """On Ctrl-C (SIGINT) or SIGTERM, save `path` so that `run.resume=true` continues."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.signal: str | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.signal = "SIGINT"
        elif isinstance(exception, SIGTERMException):
            self.signal = "SIGTERM"
        else:
            return
        trainer.save_checkpoint(self.path)
        log.warning(
            "%s: saved %s (epoch %d, step %d)",
            self.signal,
            self.path,
            trainer.current_epoch,
            trainer.global_step,
        )
