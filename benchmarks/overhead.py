"""mmkd's training step against a minimal hand-written PyTorch loop doing the same
distillation (same teacher, same student, same batch, same optimizer), side by side in one
process, in interleaved rounds so that machine noise hits both alike.

    python benchmarks/overhead.py teacher.weights=RUN_DIR/student [key=value ...]
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from mmkd.config import compose, validate
from mmkd.data import build_splits
from mmkd.data.module import RoleCollate
from mmkd.models import build_models
from mmkd.module import DistillModule


class StepClock(pl.Callback):
    """Wall-clock start and end of every training batch."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())


def one_batch(cfg: DictConfig, module: DistillModule, splits: Any) -> dict[str, Any]:
    """The first `data.batch_size` training samples, collated for every role (teacher too)."""
    roles = {"teacher": module.teacher, **module.students}
    collate = RoleCollate(
        {r: m.make_preprocessor() for r, m in roles.items()},
        train=True,
        keep_labels=True,
        num_classes=splits.num_classes,
    )
    return collate([splits.train[i] for i in range(cfg.data.batch_size)])


def mmkd_steps(
    module: DistillModule, batch: dict[str, Any], steps: int, log_dir: str
) -> list[float]:
    """Seconds of each of `steps` training steps of mmkd's LightningModule on `batch`."""
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=CSVLogger(log_dir),
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)]


def plain_steps(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: dict[str, Any],
    steps: int,
    cfg: DictConfig,
) -> list[float]:
    """The same distillation, written out by hand: KD (T²-scaled KL) + weighted CE, AdamW."""
    temperature, kd_w, ce_w = cfg.losses.kd.temperature, cfg.losses.kd.weight, cfg.losses.ce.weight
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    student.train()
    teacher.eval()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(batch["inputs"]["teacher"]).logits
        logits = student(batch["inputs"]["student"]).logits
        kd = (
            F.kl_div(
                F.log_softmax(logits / temperature, -1),
                F.log_softmax(teacher_logits / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
            * temperature**2
        )
        loss = kd_w * kd + ce_w * F.cross_entropy(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - start)
    return times


def measure_overhead(
    cfg: DictConfig, steps: int = 40, rounds: int = 5, warmup: int = 3
) -> dict[str, float]:
    """Median step time of each in `rounds` interleaved rounds of `steps` steps; the ratio is
    the median of the per-round ratios (a noisy moment then skews one round, not the result)."""
    validate(cfg)
    pl.seed_everything(0, verbose=False)
    splits = build_splits(cfg.data)
    teacher, students = build_models(cfg, splits)
    module = DistillModule(cfg, teacher, students, splits.class_names)
    batch = one_batch(cfg, module, splits)
    plain_teacher, plain_student = copy.deepcopy(teacher), copy.deepcopy(students["student"])
    ours: list[float] = []
    plain: list[float] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(rounds):
            a = mmkd_steps(module, batch, steps + warmup, log_dir)[warmup:]
            b = plain_steps(plain_teacher, plain_student, batch, steps + warmup, cfg)[warmup:]
            ratios.append(statistics.median(a) / statistics.median(b))
            ours += a
            plain += b
    return {
        "mmkd_ms": statistics.median(ours) * 1e3,
        "plain_ms": statistics.median(plain) * 1e3,
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
        "steps": steps,
        "rounds": rounds,
        "batch_size": cfg.data.batch_size,
    }


if __name__ == "__main__":
    result = measure_overhead(
        compose(["experiment=mnist_compress", "distill.cache=false", *sys.argv[1:]])
    )
    print(result)
