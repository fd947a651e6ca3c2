"""DataLoader settings that fit the machine: worker count, pinned memory, threads.

`data.num_workers=null` (the default) chooses the workers from the cores this process may use,
whether training runs on CUDA, and the measured cost of preparing one training batch in the
main process (loading and preprocessing a probe of samples, scaled to the batch size):

- one core: 0 workers;
- training on the CPU: 0 workers. The training step already uses every core, so a worker would
  only take cores from it and add the copy of every batch between processes. Set
  `data.num_workers=N` for costly CPU batches (a mid-epoch resume is bit-exact with workers
  too: the resumed pass takes its epoch from the checkpoint, as workers draw their indices
  before Lightning sets the sampler's epoch; that was the 2e-3 gap once seen with 1 worker);
- CUDA (the main process mostly waits for the GPU): one worker per `WORKER_BATCH_S` of
  preparation, at least 1, at most `cores - 1` and `MAX_WORKERS`.

Workers are persistent (kept between epochs), `pin_memory` is on when the trainer runs on
CUDA, and every worker runs torch with one thread (the DataLoader's default). When workers
are chosen, the main process's torch threads are left as they are: the choice rests on a timing,
and changing the thread count with it would change a CPU run's floating-point sums from one
start to the next (a resumed run would no longer match an uninterrupted one bit for bit). On a
small machine where workers are chosen, give the main process fewer threads yourself
(`OMP_NUM_THREADS`; measured here on the 2-core machine under load: a ResNet-8 step took 6.4 s
with 2 threads, 1.6 s with 1). `data.num_workers=N` sets the count.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmkd.replay import replay_scope

log = logging.getLogger(__name__)

WORKER_BATCH_S = 0.005  # one worker per this much preparation per batch
MAX_WORKERS = 8
PROBE_SAMPLES = 32


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_workers(cores: int, batch_seconds: float, cuda: bool) -> int:
    """The worker count for `cores` cores, `batch_seconds` to prepare one batch, and training
    on CUDA or not."""
    if cores < 2 or not cuda:
        return 0
    wanted = int(batch_seconds // WORKER_BATCH_S)
    return max(1, min(wanted, cores - 1, MAX_WORKERS))


def batch_cost(prepare: Callable[[list[int]], object], size: int, batch_size: int) -> float:
    """Seconds to prepare one batch: `prepare(indices)` timed on a batch of up to
    PROBE_SAMPLES samples, scaled to `batch_size` (a first, small call opens files and warms
    caches, and is not counted)."""
    count = min(size, PROBE_SAMPLES, batch_size)
    if count < 1:
        return 0.0
    # augmentation draws from the global generators: the probe must leave them as it found
    # them, or a resumed run (generators restored from its checkpoint before the loaders are
    # built) would continue from other random numbers than the run it resumes
    with replay_scope(0, "worker-probe", 0):
        prepare([0])
        start = time.perf_counter()
        prepare(list(range(count)))
        return (time.perf_counter() - start) / count * batch_size


@dataclass(frozen=True)
class LoaderSettings:
    num_workers: int
    pin_memory: bool
    chosen: bool  # True: chosen here; False: data.num_workers set

    def describe(self, batch_seconds: float | None, cores: int) -> str:
        if not self.chosen:
            how = "set by data.num_workers"
        elif batch_seconds is None:
            how = f"chosen for {cores} core(s), training on the CPU"
        else:
            how = f"chosen for {cores} cores and {batch_seconds * 1e3:.1f} ms to prepare a batch"
        return (
            f"data loading: {self.num_workers} workers ({how}; persistent), "
            f"pin_memory={self.pin_memory}, torch threads {torch.get_num_threads()} in the "
            "main process and 1 per worker"
        )


def loader_settings(
    configured: int | None,
    prepare: Callable[[list[int]], object],
    size: int,
    batch_size: int,
    cuda: bool,
) -> LoaderSettings:
    """The loader settings, logged once."""
    cores = available_cores()
    seconds = None
    if configured is None:
        # the cost decides only the CUDA count: elsewhere the probe would load samples for nothing
        seconds = batch_cost(prepare, size, batch_size) if cuda and cores >= 2 else None
        settings = LoaderSettings(choose_workers(cores, seconds or 0.0, cuda), cuda, chosen=True)
    else:
        settings = LoaderSettings(configured, cuda, chosen=False)
    log.info(settings.describe(seconds, cores))
    return settings
