"""Training learns: a tiny run on the generated data ends clearly above chance, and the learning
rate follows the configured warmup then cosine decay, step by step."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
from tiny import small_run, tiny_overrides

from mmkd.config import compose
from mmkd.train import train

CHANCE = 1 / 9  # the demo data's 9 classes are balanced


def supervised(run_dir, adapter: str, *extra: str) -> list[str]:
    """A tiny `adapter` student trained from labels, no teacher."""
    return [
        "teacher=none",
        "losses=supervised",
        "data.train_labels=true",
        *tiny_overrides("student", adapter),
        "student.head.classifier=true",
        f"run.dir={run_dir}",
        "trainer.extra={enable_model_summary: false}",
        *extra,
    ]


def test_a_tiny_run_learns_well_above_chance(tmp_path):
    overrides = supervised(tmp_path, "audio_cnn", *small_run(train=180, test=90, epochs=4))
    metrics = train(compose([*overrides, "optim.lr=0.01"]))
    print(f"accuracy after 4 epochs: {metrics['student/accuracy']:.3f} (chance {CHANCE:.3f})")
    assert metrics["student/accuracy"] >= 0.6  # > 5x chance


class LearningRates(pl.Callback):
    """The learning rate of the first parameter group before every optimizer step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.values.append(trainer.optimizers[0].param_groups[0]["lr"])


def expected_lr(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine to `floor` * peak."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_learning_rate_follows_warmup_then_cosine(tmp_path):
    rates = LearningRates()
    overrides = supervised(
        tmp_path,
        "image",
        *small_run(train=64, test=9, epochs=2),
        "data.batch_size=8",  # 8 steps per epoch, 16 in all
        "optim.lr=0.01",
        "optim.warmup_fraction=0.25",  # 4 warmup steps
        "optim.min_lr_ratio=0.1",
        "run.test=false",
        "run.export=false",
    )
    train(compose(overrides), callbacks=[rates])
    total, warmup = 16, 4
    expected = [expected_lr(step, total, warmup, 0.01, 0.1) for step in range(total)]
    assert rates.values == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert rates.values[0] == 0.0 and max(rates.values) == pytest.approx(0.01)
