"""Issue 14 findings 1-4, 15-17: the teacher store is verified before use, repaired chunk by
chunk, keyed by the samples' content and the teacher's settings after command-line overrides,
safe with concurrent builders and full disks."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tiny import small_run, tiny_overrides, tiny_spec

from mmkd.adapters import build_adapter
from mmkd.config import compose
from mmkd.config.schema import DemoCfg
from mmkd.data.demo import DemoDataset
from mmkd.errors import MMKDError
from mmkd.export import export_model
from mmkd.models import adopt_exported_specs
from mmkd.store import StoreBuilder, StoreSpec, TeacherStore, open_or_build, teacher_collate
from mmkd.train import main

ROOT = Path(__file__).resolve().parents[2]
SPEC = StoreSpec(chunk_size=8)  # 24 samples: 3 chunks


def teacher():
    return build_adapter(tiny_spec("image"), key="teacher").eval()


def builder(model, dataset, spec=SPEC):
    collate = teacher_collate(model.make_preprocessor(), augmented=False, seed=spec.seed)
    return StoreBuilder(
        model,
        dataset,
        collate,
        {"data": "demo"},
        spec,
        augmented=False,
        batch_size=8,
        device=torch.device("cpu"),
    )


@pytest.fixture(scope="module")
def dataset():
    return DemoDataset(OmegaConf.structured(DemoCfg), "train", 24, 0)


def counting(model, monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    forward = type(model).forward

    def counted(self, batch, layers=()):
        calls["n"] += 1
        return forward(self, batch, layers)

    monkeypatch.setattr(type(model), "forward", counted)
    return calls


def flip(path: Path, offset: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(b ^ 0xFF for b in data[offset : offset + count])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_found_and_only_that_chunk_is_rebuilt(
    tmp_path, dataset, monkeypatch, caplog
):
    """Finding 1: same-size flipped bytes in logits.npy were a hit and trained on garbage."""
    model = teacher()
    folder, _ = open_or_build(tmp_path, builder(model, dataset))
    good = {k: np.array(v) for k, v in TeacherStore.open(folder).arrays.items()}
    logits = folder / "logits.npy"
    header = logits.stat().st_size - good["logits"].nbytes
    row_bytes = good["logits"].nbytes // 24
    flip(logits, header + 9 * row_bytes)  # row 9: the chunk at row 8
    with pytest.raises(MMKDError, match=r"chunk.s. at row 8 fail their checksum"):
        TeacherStore.open(folder)
    calls = counting(model, monkeypatch)
    with caplog.at_level(logging.INFO):
        again, seconds = open_or_build(tmp_path, builder(model, dataset))
    assert again == folder and seconds is not None
    assert calls["n"] == 1  # one batch of 8: the damaged chunk alone
    assert "rebuilt 1 chunk(s)" in caplog.text
    repaired = TeacherStore.open(folder)
    for name, array in good.items():
        np.testing.assert_array_equal(repaired.arrays[name], array, err_msg=name)


def test_swapped_rows_in_the_index_are_found_and_the_index_rewritten(tmp_path, dataset):
    """Finding 1: two entries swapped in row.npy were a hit (every sample read another's)."""
    model = teacher()
    folder, _ = open_or_build(tmp_path, builder(model, dataset))
    ids = [dataset[i]["id"] for i in range(24)]
    expected = TeacherStore.open(folder).lookup(ids).embedding
    row = np.load(folder / "row.npy")
    row[[0, 1]] = row[[1, 0]]
    np.save(folder / "row.npy", row)
    with pytest.raises(MMKDError, match="the id index fail"):
        TeacherStore.open(folder)
    open_or_build(tmp_path, builder(model, dataset))
    torch.testing.assert_close(TeacherStore.open(folder).lookup(ids).embedding, expected)


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "meta"])
def test_other_damage_rebuilds_the_entry(tmp_path, dataset, damage):
    model = teacher()
    folder, _ = open_or_build(tmp_path, builder(model, dataset))
    good = np.array(TeacherStore.open(folder).arrays["embedding"])
    target = folder / ("meta.json" if damage == "meta" else "embedding.npy")
    target.write_bytes(b"" if damage == "zero_bytes" else target.read_bytes()[:200])
    _, seconds = open_or_build(tmp_path, builder(model, dataset))
    assert seconds is not None
    np.testing.assert_array_equal(TeacherStore.open(folder).arrays["embedding"], good)


def write_folder(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def folder_run(data: Path, run_dir: Path, cache: Path) -> list[str]:
    return [
        "data.name=folder",
        f"data.folder.train={data}",
        "data.folder.val_size=0.25",
        *tiny_overrides("teacher", "image"),
        "teacher.head.classifier=true",
        *tiny_overrides("student", "image"),
        "student.head.classifier=true",
        "losses=kd",
        "data.train_labels=true",
        "distill.cache=true",
        f"distill.cache_dir={cache}",
        "run.test=false",
        "run.export=false",
        *small_run(epochs=1, demo=False),
        f"run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_images_replaced_in_place_miss_the_store(tmp_path, caplog):
    """Finding 3: the store was keyed by file names only."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_folder(data)
    assert main(folder_run(data, tmp_path / "one", cache)) == 0
    first = {p.name for p in cache.iterdir()}
    time.sleep(0.01)
    write_folder(data, seed=1)  # same names, other pixels
    with caplog.at_level(logging.INFO, logger="mmkd"):
        assert main(folder_run(data, tmp_path / "two", cache)) == 0
    assert "hit" not in caplog.text
    assert len({p.name for p in cache.iterdir()} - first) == 2  # new train and val entries


def test_command_line_overrides_of_an_exported_teacher_are_applied(tmp_path, caplog):
    """Finding 2: teacher.weights=RUN/student dropped teacher.image.* overrides silently."""
    spec = tiny_spec("image", image__augment=True, image__crop_padding=4, image__hflip=0.5)
    export_model(build_adapter(spec, key="teacher"), tmp_path / "student")
    cfg = compose(
        [
            f"teacher.weights={tmp_path / 'student'}",
            "teacher.image.crop_padding=2",
            "teacher.image.hflip=0.0",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="mmkd"):
        adopt_exported_specs(cfg)
    assert cfg.teacher.image.crop_padding == 2 and cfg.teacher.image.hflip == 0.0
    assert cfg.teacher.image.augment is True  # the rest comes from the export
    lines = [r.getMessage() for r in caplog.records if "override" in r.getMessage()]
    assert len(lines) == 1 and "image.hflip=0.0 (exported: 0.5)" in lines[0], lines
    plain = compose([f"teacher.weights={tmp_path / 'student'}"])
    adopt_exported_specs(plain)
    assert plain.teacher.image.hflip == 0.5 and plain.teacher.image.crop_padding == 4


@pytest.mark.slow
def test_a_student_augmented_unlike_the_stored_views_is_warned(tmp_path, caplog):
    """Finding 4: changing only the student's augmentation reused the store without a word."""
    common = [
        *tiny_overrides("teacher", "image"),
        "teacher.head.classifier=true",
        "teacher.image.augment=true",
        "teacher.image.crop_padding=2",
        *tiny_overrides("student", "image"),
        "student.head.classifier=true",
        "student.image.augment=true",
        "losses=kd",
        "data.train_labels=true",
        "distill.store.views=2",
        "run.test=false",
        "run.export=false",
        *small_run(epochs=1),
    ]
    with caplog.at_level(logging.WARNING, logger="mmkd"):
        assert main([*common, "student.image.crop_padding=2", f"run.dir={tmp_path / 'same'}"]) == 0
        assert "views that teacher never saw" not in caplog.text
        assert main([*common, "student.image.crop_padding=3", f"run.dir={tmp_path / 'other'}"]) == 0
    lines = [r.getMessage() for r in caplog.records if "never saw" in r.getMessage()]
    assert len(lines) == 1 and "crop_padding" in lines[0], lines


def test_full_disk_at_preallocation_is_one_line_and_leaves_nothing(tmp_path, dataset, monkeypatch):
    """Finding 15 and 16: a full disk gave a SIGBUS (sparse memory map) or a raw traceback."""

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(
        MMKDError, match=r"teacher store .*\.npy: not enough disk space: [\d,]+ bytes"
    ) as err:
        open_or_build(tmp_path, builder(teacher(), dataset))
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("*.partial"))


def test_free_space_is_checked_before_writing(tmp_path, dataset, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        MMKDError, match=r"\.partial: not enough disk space: [\d,]+ bytes needed, 1,000 free"
    ):
        open_or_build(tmp_path, builder(teacher(), dataset))
    assert not list(tmp_path.glob("*.partial"))


def test_disk_filling_during_the_build_keeps_a_resumable_partial(tmp_path, dataset, monkeypatch):
    model = teacher()
    real = Path.write_text
    state = {"n": 0}

    def filling(self, text, *args, **kwargs):
        if self.suffix == ".done":
            state["n"] += 1
            if state["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", filling)
    with pytest.raises(MMKDError, match=r"the disk filled .* partial build is kept") as err:
        open_or_build(tmp_path, builder(model, dataset))
    assert "\n" not in str(err.value)
    partial = next(tmp_path.glob("*.partial"))
    assert [p.name for p in (partial / "chunks").iterdir()] == ["0.done"]
    monkeypatch.setattr(Path, "write_text", real)
    calls = counting(model, monkeypatch)
    folder, _ = open_or_build(tmp_path, builder(model, dataset))
    assert calls["n"] == 1 + 2  # the shape probe, then the two chunks not done
    TeacherStore.open(folder)


BUILD = textwrap.dedent("""
    import logging, sys, time, torch
    logging.basicConfig(level=logging.INFO)
    from pathlib import Path
    from omegaconf import OmegaConf
    sys.path.insert(0, {tests!r})
    from tiny import tiny_spec
    from mmkd.adapters import build_adapter
    from mmkd.config.schema import DemoCfg
    from mmkd.data.demo import DemoDataset
    from mmkd.store import StoreBuilder, StoreSpec, open_or_build, teacher_collate
    torch.manual_seed(0)
    model = build_adapter(tiny_spec("image"), key="teacher").eval()
    slow = float(sys.argv[2])
    forward = type(model).forward
    def slowed(self, batch, layers=()):
        time.sleep(slow)
        return forward(self, batch, layers)
    type(model).forward = slowed
    data = DemoDataset(OmegaConf.structured(DemoCfg), "train", 24, 0)
    spec = StoreSpec(chunk_size=4)
    collate = teacher_collate(model.make_preprocessor(), augmented=False, seed=0)
    b = StoreBuilder(model, data, collate, {{"data": "demo"}}, spec, augmented=False,
                     batch_size=4, device=torch.device("cpu"))
    folder, seconds = open_or_build(Path(sys.argv[1]), b)
    print("BUILT" if seconds is not None else "FOUND", folder, flush=True)
""")


def start(root: Path, slow: float) -> subprocess.Popen:
    code = BUILD.format(tests=str(ROOT / "tests"))
    return subprocess.Popen(
        [sys.executable, "-c", code, str(root), str(slow)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_builders_at_once_one_builds_the_other_waits_and_reads(tmp_path):
    """Finding 17: the second run died with FileNotFoundError on .partial/chunks/N.done."""
    first = start(tmp_path, 2.0)  # 6 batches: a 12 s build, longer than the second's start-up
    deadline = time.time() + 120  # the second starts once the first is building (holds the lock)
    while time.time() < deadline and not list(tmp_path.glob("*.partial")):
        time.sleep(0.05)
    second = start(tmp_path, 0.0)
    out = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[1][-2000:] for o in out]
    assert "BUILT" in out[0][0] and "FOUND" in out[1][0], out
    assert "waiting for another process" in out[1][1] or "built by another run" in out[1][1]
    TeacherStore.open(next(p for p in tmp_path.iterdir() if p.is_dir()))


@pytest.mark.slow
def test_a_dead_builders_lock_is_taken_over_and_its_build_resumed(tmp_path):
    dying = start(tmp_path, 0.3)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*.partial/chunks/*.done")):
        time.sleep(0.1)
    dying.send_signal(signal.SIGKILL)
    dying.communicate()
    assert list(tmp_path.glob("*.lock")), "the dead builder's lock file stays"
    done = len(list(tmp_path.glob("*.partial/chunks/*.done")))
    assert 0 < done < 6
    again = start(tmp_path, 0.0)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "BUILT" in out, err[-2000:]
    assert f"{6 - done} of 6 chunks left" in err or f"{6 - done - 1} of 6 chunks left" in err, err


class OneUnreadable(torch.utils.data.Dataset):
    """The demo samples, sample 5 unreadable (as under data.on_error=skip)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def sample_id(self, index: int) -> str:
        return self.inner[index]["id"]

    def __getitem__(self, index: int):
        from mmkd.data.base import Skipped

        if index == 5:
            return Skipped(self.sample_id(5), "broken.png: cannot identify image file")
        return self.inner[index]


def test_a_skipped_sample_is_warned_once_not_once_per_view(tmp_path, dataset, caplog):
    """Finding 24: the skip warning repeated for every stored view."""
    model = build_adapter(
        tiny_spec("image", image__augment=True, image__crop_padding=2), key="teacher"
    ).eval()
    spec = StoreSpec(views=3, seed=0, chunk_size=8)
    collate = teacher_collate(model.make_preprocessor(), augmented=True, seed=0, on_error="skip")
    build = StoreBuilder(
        model,
        OneUnreadable(dataset),
        collate,
        {"data": "skip"},
        spec,
        augmented=True,
        batch_size=8,
        device=torch.device("cpu"),
    )
    with caplog.at_level(logging.WARNING):
        folder, _ = open_or_build(tmp_path, build)
    lines = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(lines) == 1 and "broken.png" in lines[0], lines
    assert TeacherStore.open(folder).arrays["present"][5].tolist() == [0, 0, 0]


@pytest.mark.slow
def test_store_build_time_reaches_every_logger(tmp_path):
    """Finding 26: time/store_build_s reached only the first logger."""
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides("teacher", "image"),
        "teacher.head.classifier=true",
        *tiny_overrides("student", "image"),
        "student.head.classifier=true",
        "losses=kd",
        "data.train_labels=true",
        "distill.cache=true",
        "run.loggers=[tensorboard,csv]",
        "run.test=false",
        "run.export=false",
        *small_run(epochs=1),
        f"run.dir={run_dir}",
    ]
    assert main(overrides) == 0
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "time/store_build_s" in header
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert "time/store_build_s" in events.Tags()["scalars"]


def test_store_list_and_gc_show_and_remove_leftover_partials(tmp_path, dataset, capsys):
    """Finding 15: a .partial left by a failed build stayed with no way to see or remove it."""
    from mmkd.cli import main as mmkd

    model = teacher()
    open_or_build(tmp_path, builder(model, dataset))  # a finished entry
    small = DemoDataset(OmegaConf.structured(DemoCfg), "train", 16, 0)
    collate = teacher_collate(model.make_preprocessor(), augmented=False, seed=0)
    other = StoreBuilder(
        model,
        small,
        collate,
        {"data": "demo16"},
        SPEC,
        augmented=False,
        batch_size=8,
        device=torch.device("cpu"),
    )
    partial = tmp_path / f"{other.key}.partial"
    real = other.fill

    def killed(markers, arrays, starts, ids, progress=True):
        real(markers, arrays, starts[:1], ids, progress)
        raise KeyboardInterrupt

    other.fill = killed
    with pytest.raises(KeyboardInterrupt):
        open_or_build(tmp_path, other)
    assert partial.is_dir()
    assert mmkd(["store", "list", str(tmp_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "1/2 chunks done" in out and "24 x 1 views, verified" in out, out
    assert mmkd(["store", "gc", str(tmp_path)]) == 0
    assert not partial.exists()
    assert [p.name for p in tmp_path.iterdir()] == [builder(model, dataset).key]


def test_ranks_wait_for_another_runs_lock_in_short_collectives(tmp_path, monkeypatch):
    """While another run holds the builder's lock, rank 0 waits in polls of LOCK_POLL_S and
    every rank meets it in one short collective per poll, instead of one collective lasting
    the other run's whole build (a process group times out after 30 min)."""
    import threading

    from filelock import FileLock

    from mmkd.store import coordination

    monkeypatch.setattr(coordination, "LOCK_POLL_S", 0.05)
    path = tmp_path / "entry.lock"
    other_run = FileLock(str(path), thread_local=False)  # released by the timer thread
    other_run.acquire()
    threading.Timer(0.4, other_run.release).start()
    calls: list[bool] = []

    def any_rank(flag: bool) -> bool:  # rank 0's flag; the other ranks contribute False
        calls.append(flag)
        return flag

    group = coordination.Collective(rank=0, world=2, any=any_rank)
    lock = coordination.acquire_together(path, tmp_path / "entry", group)
    assert lock is not None and lock.is_locked
    assert calls[-1] is False and calls.count(True) >= 3  # several short rounds, then go
    lock.release()
    other_rank = coordination.Collective(rank=1, world=2, any=lambda flag: flag)
    assert coordination.acquire_together(path, tmp_path / "entry", other_rank) is None
