"""Lightning callbacks mmkd adds to every run."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl

from mmkd.data.resume import ResumableLoader


class EpochTimer(pl.Callback):
    """Logs the wall time of each training epoch (`time/train_epoch_s`: the training batches
    only, validation and the teacher-cache build excluded; not logged for an epoch resumed
    mid-way), of its validation (`time/val_epoch_s`), and the training throughput
    (`time/train_samples_per_s`, over the batches this process trained)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.samples = 0
        self.val_start = 0.0
        self.val_seconds = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samples = 0
        self.val_seconds = 0.0
        self.start = time.perf_counter()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_seconds += time.perf_counter() - self.val_start
        pl_module.log(
            "time/val_epoch_s",
            self.val_seconds,
            on_step=False,
            on_epoch=True,
            reduce_fx="max",
            sync_dist=True,
        )

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
        seconds = time.perf_counter() - self.start - self.val_seconds
        loader = trainer.train_dataloader
        resumed = isinstance(loader, ResumableLoader) and loader.pass_start()[1] > 0
        if not resumed:  # an epoch resumed mid-way trained only its rest: not an epoch's time
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


class TrackTrainedBatches(pl.Callback):
    """Reports each finished training batch to the training loader (a `ResumableLoader`)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.tracked = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.batch_trained()
