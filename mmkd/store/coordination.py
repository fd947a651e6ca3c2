"""Who builds a store entry, and when: the processes of a run build it together (`Collective`),
one run at a time (a file lock the kernel drops when its holder dies); everyone else waits, then
opens the finished entry."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout

from mmkd.errors import CheckpointError, DiskSpaceError
from mmkd.store.read import StoreDamaged, TeacherStore

if TYPE_CHECKING:
    from mmkd.store.build import StoreBuilder

log = logging.getLogger(__name__)

LOCK_POLL_S = 5.0  # how long rank 0 tries the builder's lock between collectives (and logs)


@dataclass(frozen=True)
class Collective:
    """The processes that build a store together (one process by default). Lightning runs
    pass their strategy's barrier and boolean reduction."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[str], None] = lambda name: None
    any: Callable[[bool], bool] = lambda flag: flag


def open_or_build(
    root: Path, builder: StoreBuilder, group: Collective | None = None
) -> tuple[Path, float | None]:
    """Make sure the entry for this teacher and data exists and passes its checksums (every
    process of `group` calls this); returns (folder, build seconds, or None when it was there).

    One builder at a time: global rank 0 holds `ROOT/<key>.lock` while its group builds or
    repairs; another run waits for it, then finds the finished entry."""
    group = group or Collective()
    folder = root / builder.key
    problem = entry_problem(folder)
    if not group.any(problem is not None):  # one decision for all processes
        log.info("teacher store%s: hit %s", builder.label, folder)
        return folder, None
    lock, done = None, False
    if group.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    lock = acquire_together(root / f"{builder.key}.lock", folder, group, builder.check_stop)
    try:
        if group.rank == 0:  # another run may have built or repaired it while this one waited
            problem = entry_problem(folder)
        if not group.any(group.rank == 0 and problem is not None):
            log.info("teacher store%s: built by another run: %s", builder.label, folder)
            done = True
            return folder, None
        repairable = isinstance(problem, StoreDamaged)
        repair = group.any(group.rank == 0 and repairable)
        if group.rank == 0 and not isinstance(problem, Missing):
            log.warning("%s; %s", problem, "rebuilding those" if repair else "rebuilding it")
        # the pass over the data must not move the training RNG: a run draws the same random
        # numbers (dropout, shuffling seeds) with the store as without it
        cuda = [builder.device] if builder.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), disk_full_is_one_line(folder):
            if repair:
                seconds = 0.0
                if group.rank == 0:
                    assert isinstance(problem, StoreDamaged)
                    seconds = builder.repair(folder, problem)
                group.barrier("teacher-store-repaired")
            else:
                seconds = builder.build(folder, group)
        group.barrier("teacher-store-ready")
        done = True
        return folder, seconds
    finally:
        if lock is not None:
            lock.release()
            if done:  # safe: whoever waited on it re-checks and finds the finished entry
                Path(lock.lock_file).unlink(missing_ok=True)


class Missing(CheckpointError):
    """No entry there yet."""


def entry_problem(folder: Path) -> CheckpointError | None:
    """Why the entry at `folder` cannot be read as it is (Missing, StoreDamaged, other), or
    None when it opens and passes every checksum."""
    if not folder.exists():
        return Missing(f"teacher store {folder}: missing")
    try:
        TeacherStore.open(folder)
    except CheckpointError as err:
        return err
    return None


def acquire_together(
    path: Path, folder: Path, group: Collective, check_stop: Callable[[], None] = lambda: None
) -> FileLock | None:
    """Global rank 0 takes the builder's lock for `folder` (returned; None on other ranks),
    waiting while another run holds it, with one line saying so. The kernel drops a dead
    process's lock, so its successor takes over.

    The other ranks wait with it in short collectives, one every `LOCK_POLL_S`, instead of in
    one collective that lasts as long as another run's build: a process group's collectives
    time out (30 min by default) and a build can take longer."""
    lock = FileLock(str(path)) if group.rank == 0 else None
    waited = 0.0
    while True:
        held = True
        if lock is not None:
            try:
                lock.acquire(timeout=LOCK_POLL_S)
            except Timeout:
                check_stop()
                held = False
                waited += LOCK_POLL_S
                if waited == LOCK_POLL_S:
                    log.info(
                        "teacher store: waiting for another process building %s (lock %s)",
                        folder,
                        path,
                    )
        if not group.any(not held):
            return lock


class disk_full_is_one_line:
    """Turns ENOSPC while building the entry at `folder` into one DiskSpaceError line; the
    partial build stays, resumable (`mmkd store gc ROOT` removes it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, trace: Any) -> None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskSpaceError(
                f"teacher store {self.folder}: the disk filled ({err.strerror}); the partial "
                f"build is kept and resumes next time, `mmkd store gc {self.folder.parent}` "
                "removes it"
            ) from None
