"""Lightning callbacks mmkd adds to every run."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class EpochTimer(pl.Callback):
    """Logs the wall time of each training epoch (`time/train_epoch_s`, teacher-cache build
    excluded) and its throughput (`time/train_samples_per_s`, this process's samples)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.samples = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samples = 0
        self.start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.samples += len(batch["ids"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self.start
        pl_module.log(
            "time/train_epoch_s",
            seconds,
            on_step=False,
            on_epoch=True,
            reduce_fx="max",
            sync_dist=True,
        )
        pl_module.log(
            "time/train_samples_per_s",
            self.samples / max(seconds, 1e-9),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            sync_dist=True,
        )
