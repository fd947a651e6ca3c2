"""One process trains in a run folder at a time.

Two `mmkd train` commands pointed at the same `run.dir` (a resumed benchmark started twice, a
scheduler that retries a job while the first attempt still runs) would write the same
checkpoints and logs and leave a run that is neither. The launching process holds an OS file
lock on RUN_DIR/.run.lock while it trains; a second one is refused in one line. The OS drops the
lock when its process dies, so a killed run never leaves a stale lock behind. DDP worker
processes (started by the launching process, or by torchrun / SLURM with a non-zero rank) do not
take it: the launching process holds it for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from mmkd.errors import ConfigError

LOCK_NAME = ".run.lock"
# set by Lightning's launcher, torchrun and SLURM in the processes that are not the first one
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def launching_process() -> bool:
    """Whether this is the process that started the run (rank 0 of node 0, or no DDP at all)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR/.run.lock for the block (in the launching process only); ConfigError at
    `run.dir` when another process holds it."""
    if not launching_process():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"run.dir: {run_dir} is in use by another mmkd process that is training in it "
            f"(it holds {run_dir / LOCK_NAME}); wait for it to finish, or choose another run.dir"
        ) from None
    try:
        yield
    finally:
        lock.release()
