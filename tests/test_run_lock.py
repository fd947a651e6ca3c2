"""One process trains in a run folder at a time (mmkd.run_lock)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from tiny import small_run

from mmkd.config import compose
from mmkd.errors import ConfigError
from mmkd.run_lock import LOCK_NAME, run_dir_lock
from mmkd.train import train

HOLD = textwrap.dedent(
    """
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1]); lock.acquire()
    print("held", flush=True); time.sleep(120)
    """
)


@pytest.fixture
def other_process(tmp_path):
    """Another process that holds RUN_DIR/.run.lock until it is killed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir / LOCK_NAME)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    yield run_dir, holder
    holder.kill()
    holder.wait()


def test_a_second_run_in_a_busy_run_dir_is_refused_and_works_once_the_first_is_gone(
    other_process,
):
    run_dir, holder = other_process
    cfg = compose([*small_run(train=32), f"run.dir={run_dir}", "run.resume=true"])
    with pytest.raises(ConfigError, match=r"^run\.dir: .* is in use by another mmkd process"):
        train(cfg)
    assert not (run_dir / "checkpoints").exists()  # refused before any work
    holder.kill()  # the OS drops a dead process's lock: no stale lock blocks the next run
    holder.wait()
    metrics = train(compose([*small_run(train=32), f"run.dir={run_dir}", "run.resume=true"]))
    assert "student/accuracy" in metrics
    with run_dir_lock(run_dir):  # released when the run ended
        pass


def test_ddp_worker_processes_do_not_take_the_lock(other_process, monkeypatch):
    run_dir, _ = other_process
    monkeypatch.setenv("LOCAL_RANK", "1")  # a worker Lightning started for the launching process
    with run_dir_lock(run_dir):
        pass
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="in use"), run_dir_lock(run_dir):
        pass
