"""Start-up check of the evaluation data: every validation and test sample is decoded once
before training, so a bad file there fails the run at once (naming the file) instead of after a
whole training epoch. Costs one decoding pass over val + test (no model runs); see the README
("Fail early") for measured times. `data.check_eval_data=false` turns it off."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator

from torch.utils.data import Dataset

from mmkd.data.base import RawSample, Skipped
from mmkd.data.webdataset import ShardStream

log = logging.getLogger(__name__)


def raw_samples(dataset: Dataset) -> Iterator[RawSample | Skipped]:
    """Every sample of a map-style dataset or a shard stream, decoded (no preprocessing)."""
    if isinstance(dataset, ShardStream):
        yield from dataset  # unconfigured: every sample once, in shard order
        return
    for index in range(len(dataset)):  # type: ignore[arg-type]
        yield dataset[index]


def check_decodes(splits: Iterable[tuple[str, Dataset]]) -> dict[str, int]:
    """Decode every sample of each (name, dataset); a bad one raises DataError naming it (as the
    dataset reports it), or under data.on_error=skip is counted. Returns skipped per split. A
    dataset listed twice (test = val) is checked once."""
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:  # DDP: the launching process checked
        return {}
    seen: set[int] = set()
    skipped: dict[str, int] = {}
    for name, dataset in splits:
        if id(dataset) in seen:
            continue
        seen.add(id(dataset))
        start, count, bad = time.perf_counter(), 0, 0
        for sample in raw_samples(dataset):
            count += 1
            if isinstance(sample, Skipped):
                bad += 1
        skipped[name] = bad
        seconds = time.perf_counter() - start
        if bad:
            log.warning("%s: %d of %d samples cannot be decoded (skipped)", name, bad, count)
        log.info("%s: %d samples decode (checked in %.1f s)", name, count - bad, seconds)
    return skipped
