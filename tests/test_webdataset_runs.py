"""train.py on WebDataset shards: 2-process DDP with uneven shards, and kill-and-resume."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_resume import SCRIPT
from test_webdataset import CLASSES, write_shards
from tiny import tiny_overrides

from mmkd.export import load_exported

ROOT = Path(__file__).resolve().parents[1]


def shard_overrides(folder: Path) -> list[str]:
    write_shards(folder / "train", [7, 5, 9, 1, 2])  # uneven: whole shards cannot balance 2 ranks
    write_shards(folder / "val", [4, 2], prefix="val", tag="v")  # keys of their own
    return [
        "teacher=none",
        "losses=supervised",
        "data.train_labels=true",
        *tiny_overrides("student", "image"),
        "student.head.classifier=true",
        "student.head.dropout=0.3",  # draws from the RNG: resume must restore it
        "data.name=webdataset",
        f"data.webdataset.train={folder / 'train'}",
        f"data.webdataset.val={folder / 'val'}",
        f"data.webdataset.class_names=[{','.join(CLASSES)}]",
        "data.webdataset.shuffle_buffer=5",
        "data.batch_size=4",
        "data.num_workers=2",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "run.latency_seconds=0.02",
    ]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=420, **kwargs
    )


@pytest.mark.slow
def test_two_process_ddp_with_uneven_shards_finishes(tmp_path):
    overrides = shard_overrides(tmp_path / "shards")
    result = run(
        [
            "train.py",
            *overrides,
            "trainer.devices=2",
            "trainer.strategy=ddp",
            f"run.dir={tmp_path / 'run'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "run" / "logs" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("time/train_epoch_s")]
    # 24 samples / (2 ranks x 2 workers) = 6 per worker: 2 batches each, 4 per rank and epoch
    assert [int(r["step"]) for r in rows] == [3, 7]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["student/accuracy"] >= 0


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    overrides = [*shard_overrides(tmp_path / "shards"), "run.checkpoint_every_n_steps=1"]

    def script(run_dir: Path, *extra: str, step: int = -1) -> subprocess.CompletedProcess:
        code = SCRIPT.format(step=step, signal="SIGKILL")
        return run(["-c", code, *overrides, f"run.dir={run_dir}", *extra])

    whole = script(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    # 6 batches per epoch (2 workers x ceil(12 / 4)); step 9 is batch 3 of epoch 1, so the
    # resumed epoch starts with the second worker's turn
    killed = script(tmp_path / "killed", step=9)
    assert killed.returncode == -signal.SIGKILL
    resumed = script(tmp_path / "killed", "run.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_exported(tmp_path / "whole" / "student").model.state_dict()
    b = load_exported(tmp_path / "killed" / "student").model.state_dict()
    worst = max(float((v.float() - b[k].float()).abs().max()) for k, v in a.items())
    print(f"resumed vs uninterrupted (webdataset): largest weight difference {worst:.2e}")
    assert worst <= 1e-5
