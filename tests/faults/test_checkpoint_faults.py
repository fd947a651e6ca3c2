"""Issue 14 findings 10, 11, 12, 16, 18, 23: checkpoints are written atomically in their own
folder with a checksum, a damaged last one falls back to the previous good one, a full disk
gives one line, and a resumed run continues its metrics.csv."""

from __future__ import annotations

import csv
import errno
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from tiny import tiny_overrides

from mmkd.checkpoint import SafeCheckpointIO
from mmkd.errors import CheckpointError, MMKDError
from mmkd.train import main

RUN = [
    "teacher=none",
    "losses=supervised",
    "data.train_labels=true",
    *tiny_overrides("student", "audio_cnn"),
    "student.head.classifier=true",
    "data.demo.num_train=48",
    "data.demo.num_val=16",
    "data.demo.num_test=16",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "run.latency_seconds=0.02",
    "run.checkpoint_every_n_steps=1",
]  # 3 steps an epoch, a checkpoint after each


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_epoch")
    assert main([*RUN, f"run.dir={run_dir}"]) == 0
    return run_dir


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def csv_epochs(run_dir: Path) -> set[int]:
    with (run_dir / "logs" / "metrics.csv").open() as handle:
        return {int(float(row["epoch"])) for row in csv.DictReader(handle) if row.get("epoch")}


def resume(run_dir: Path) -> int:
    return main([*RUN, f"run.dir={run_dir}", "run.resume=true", "trainer.max_epochs=2"])


@pytest.mark.slow
def test_checkpoints_keep_a_checksum_and_the_previous_one(finished):
    folder = finished / "checkpoints"
    assert (folder / "last.ckpt.sha256").is_file()
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3
    assert torch.load(folder / "last.ckpt.prev", weights_only=True)["global_step"] == 2
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped", "zero_bytes", "truncated"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous(finished, tmp_path, damage, caplog):
    """Findings 11 and 18: a same-size corrupted checkpoint resumed silently, a zero-byte one
    raised IndexError. Finding 12: the resumed run keeps the rows logged before."""
    run_dir = copy_run(finished, tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    if damage == "flipped":
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    last.write_bytes(
        b""
        if damage == "zero_bytes"
        else bytes(data[: len(data) // 2])
        if damage == "truncated"
        else bytes(data)
    )
    with caplog.at_level(logging.WARNING, logger="mmkd"):
        assert resume(run_dir) == 0
    lines = [r.getMessage() for r in caplog.records if "previous checkpoint" in r.getMessage()]
    assert len(lines) == 1 and "last.ckpt.prev" in lines[0], lines
    assert torch.load(last, weights_only=True)["global_step"] == 6  # trained on from step 2
    assert csv_epochs(run_dir) == {0, 1}


@pytest.mark.slow
def test_resume_appends_to_metrics_csv(finished, tmp_path):
    """Finding 12: on resume, logs/metrics.csv lost every row before the checkpoint."""
    run_dir = copy_run(finished, tmp_path)
    before = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    assert resume(run_dir) == 0
    after = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    assert csv_epochs(run_dir) == {0, 1}
    assert len(after) > len(before)
    first_rows = [line for line in before[1:] if line]
    header_before, header_after = before[0].split(","), after[0].split(",")
    assert set(header_before) <= set(header_after)
    assert len([line for line in after[1:] if line]) > len(first_rows)


@pytest.mark.slow
def test_both_checkpoints_damaged_is_one_line(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    prev = run_dir / "checkpoints" / "last.ckpt.prev"
    prev.write_bytes(prev.read_bytes()[:100])
    assert resume(run_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.ckpt: empty (0 bytes)" in err[0], err
    assert "Traceback" not in "\n".join(err)


def test_unreadable_checkpoint_message_is_whole(tmp_path):
    """Finding 23: the error text was cut mid-sentence at 200 characters."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError) as err:
        SafeCheckpointIO().load_checkpoint(path)
    text = str(err.value)
    assert (
        "(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding "
        "central directory)" in text
    )
    assert text.endswith("restore it from a copy.")
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty checkpoint"):
        SafeCheckpointIO().load_checkpoint(path)


def test_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """Findings 10 and 16: the checkpoint went through a temp file on another file system and a
    full run disk left a truncated last.ckpt (or a raw ENOSPC traceback)."""
    io = SafeCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(10)}, last)
    good = last.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(MMKDError, match=r"last\.ckpt: the disk filled while writing") as err:
        io.save_checkpoint({"w": torch.ones(100_000)}, last)
    assert "\n" not in str(err.value)
    assert last.read_bytes() == good
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_free_space_is_checked_before_writing(finished, tmp_path, monkeypatch, capsys):
    """Finding 16: space is checked against the checkpoint's size before any byte is written,
    and against an estimate at start-up, in one line naming the path and the bytes."""
    io = SafeCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(10)}, last)
    good = last.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(
        MMKDError, match=r"last\.ckpt: not enough disk space: [\d,]+ bytes needed, 100 free"
    ):
        io.save_checkpoint({"w": torch.ones(100_000)}, last)
    assert last.read_bytes() == good
    run_dir = tmp_path / "new_run"
    assert main([*RUN, f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough disk space" in err[0] and str(run_dir) in err[0], err
