"""Issue 14, class folders and evaluation data (findings 9, 13, 29): a class folder with no
usable file is refused, a bad validation file fails the run before any training step, and the
README's plain folder example trains."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import pytorch_lightning as pl

from mmkd.config import compose
from mmkd.data import build_splits
from mmkd.errors import ConfigError, DataError
from mmkd.train import main, train

README = Path(__file__).resolve().parents[2] / "README.md"
FAST = ["data.batch_size=4", "trainer.enable_progress_bar=false", "run.latency_seconds=0.02"]
FOLDER_RUN = [  # labels, no teacher: what a class-folder run needs (written out, not an experiment)
    "teacher=none",
    "losses=supervised",
    "data.train_labels=true",
    "student.head.classifier=true",
    "data.name=folder",
]


def photos(media, root: str, classes: tuple[str, ...] = ("cat", "dog"), n: int = 4) -> None:
    for name in classes:
        for i in range(n):
            media.png(f"{root}/{name}/{i:04d}.png", size=(12, 12), mode="RGB")


def test_class_folder_without_usable_files_is_refused(tmp_path, media, data_cfg):
    """Finding 9: a class folder holding only non-sample files became a class of 0 samples."""
    photos(media, "train")
    media.raw("train/eel/README.txt", b"no pictures yet")
    cfg = data_cfg("folder", folder={"train": str(tmp_path / "train"), "val_size": 2})
    with pytest.raises(
        ConfigError, match=r"data\.folder\.train: class folder .*train/eel holds no"
    ):
        build_splits(cfg)


class CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.batches += 1


def test_bad_validation_file_fails_before_training(tmp_path, media):
    """Finding 13: found only after the whole training epoch (and the epoch was lost)."""
    photos(media, "train")
    photos(media, "val", n=2)
    media.raw("val/dog/0001.png", b"\x89PNG broken")

    def overrides(run: str) -> list[str]:
        return [
            *FOLDER_RUN,
            f"data.folder.train={tmp_path / 'train'}",
            f"data.folder.val={tmp_path / 'val'}",
            f"run.dir={tmp_path / run}",
            "trainer.max_epochs=1",
            *FAST,
        ]

    counter = CountBatches()
    with pytest.raises(DataError, match=r"val/dog/0001\.png"):
        train(compose(overrides("run")), callbacks=[counter])
    assert counter.batches == 0
    # the check can be turned off; then the same file fails in validation, after training
    # (without the decode cache, whose build would decode it before training too)
    counter = CountBatches()
    late = [*overrides("late"), "data.check_eval_data=false", "data.decode_cache=false"]
    with pytest.raises(DataError, match=r"val/dog/0001\.png"):
        train(compose(late), callbacks=[counter])
    assert counter.batches > 0


def test_readme_folder_example_trains(tmp_path, media, monkeypatch):
    """Finding 29: the README's plain folder example failed with the default text teacher."""
    text = README.read_text()
    match = re.search(r"<!-- folder-example -->\n```bash\n(python train\.py [^\n]*)\n", text)
    assert match, "README lost its folder example"
    args = shlex.split(match.group(1))[2:]
    photos(media, "photos/train", n=6)  # 11 train images: no batch of 1 for BatchNorm
    monkeypatch.chdir(tmp_path)  # the example's relative photos/train
    code = main([*args, f"run.dir={tmp_path / 'run'}", "trainer.max_epochs=1", *FAST])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "student/accuracy" in metrics
