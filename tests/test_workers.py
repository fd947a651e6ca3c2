"""Worker defaults (mmkd.data.workers): what the module docstring and the README say."""

from __future__ import annotations

import pytest

from mmkd.data import workers
from mmkd.data.workers import choose_workers, loader_settings

REAL_RULE = workers.choose_workers


@pytest.fixture(autouse=True)
def real_rule(monkeypatch) -> None:
    """Undo conftest's no_chosen_workers: these tests check the documented rule."""
    monkeypatch.setattr(workers, "choose_workers", REAL_RULE)


@pytest.mark.parametrize(
    ("cores", "batch_ms", "cuda", "expected"),
    [
        (2, 3.0, False, 0),  # CPU training: the main process prepares batches ...
        (16, 49.0, False, 0),
        (2, 60.0, False, 0),  # ... however costly (bit-exact resume needs 0 workers)
        (16, 60.0, True, 8),  # CUDA: one per 5 ms of preparation, at most 8 ...
        (16, 20.0, True, 4),  # ... workers even for cheap batches ...
        (2, 1.0, True, 1),  # ... at least one
        (4, 1000.0, True, 3),
        (1, 1000.0, True, 0),  # one core: no worker
    ],
)
def test_worker_count(cores, batch_ms, cuda, expected):
    assert choose_workers(cores, batch_ms / 1e3, cuda) == expected


def test_settings_measure_the_batch_cost_only_when_not_configured(monkeypatch, caplog):
    calls: list[list[int]] = []

    def prepare(indices: list[int]) -> None:
        calls.append(indices)

    monkeypatch.setattr(workers, "available_cores", lambda: 2)
    caplog.set_level("INFO", logger="mmkd.data.workers")
    chosen = loader_settings(None, prepare, size=100, batch_size=64, cuda=False)
    assert chosen.num_workers == 0 and not chosen.pin_memory and chosen.chosen
    assert calls == []  # on the CPU the count is 0 whatever the cost: nothing is probed
    assert "0 workers (chosen for 2 core(s), training on the CPU" in caplog.text
    on_cuda = loader_settings(None, prepare, size=100, batch_size=64, cuda=True)
    assert on_cuda.num_workers >= 1 and on_cuda.pin_memory
    assert calls == [[0], list(range(32))]  # one warm-up sample, then a 32-sample probe
    assert "chosen for 2 cores and" in caplog.text
    calls.clear()
    given = loader_settings(3, prepare, size=100, batch_size=64, cuda=True)
    assert given.num_workers == 3 and given.pin_memory and calls == []
    assert "set by data.num_workers" in caplog.text


def test_chosen_workers_leave_torch_threads_alone(monkeypatch):
    """The worker choice rests on a timing; the thread count must not follow it, or a resumed
    run would compute with other threads than the run it continues (no bit-exact resume)."""
    import time

    import torch

    monkeypatch.setattr(workers, "available_cores", lambda: 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        slow = loader_settings(None, lambda i: time.sleep(0.1), size=100, batch_size=64, cuda=True)
        assert slow.num_workers == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_batch_transfer_moves_tensors_and_leaves_id_lists_alone():
    """The DataModule's own transfer hook: tensors (nested too) reach the device; lists of ids,
    views and skip reasons are passed through untouched (not walked item by item)."""
    import torch

    from mmkd.data.datamodule import DistillDataModule

    data = DistillDataModule.__new__(DistillDataModule)  # the hook reads no state
    ids, skipped = ["a", "b"], [("c", "unreadable")]
    batch = {
        "inputs": {"student": {"pixels": torch.zeros(2, 3)}},
        "labels": torch.tensor([0, 1]),
        "ids": ids,
        "views": [0, 1],
        "skipped": 1,
        "skipped_ids": skipped,
    }
    moved = data.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["inputs"]["student"]["pixels"].device.type == "meta"
    assert moved["labels"].device.type == "meta"
    assert moved["ids"] is ids and moved["skipped_ids"] is skipped
    assert moved["views"] == [0, 1] and moved["skipped"] == 1
