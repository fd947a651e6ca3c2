"""A teacher store built by 2 processes (CPU / gloo) holds exactly what a 1-process build does;
each process fills its own chunks, so the work is split."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORLD = 2


def build_store(root: Path, rank: int = 0, world: int = 1) -> tuple[Path, int]:
    """Build the tiny augmented store; returns (folder, teacher forward passes this process)."""
    from omegaconf import OmegaConf
    from test_store import AUGMENT, builder, teacher
    from tiny import tiny_spec  # noqa: F401  (resolvers)

    from mmkd.config.schema import DemoCfg
    from mmkd.data.demo import DemoDataset
    from mmkd.store import Collective, StoreSpec, open_or_build

    torch.manual_seed(0)  # the same teacher weights in every process
    model = teacher(**AUGMENT)
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    dataset = DemoDataset(OmegaConf.structured(DemoCfg), "train", 24, 0)
    group = Collective()
    if world > 1:

        def any_rank(flag: bool) -> bool:
            value = torch.tensor([int(flag)])
            dist.all_reduce(value)
            return bool(value.item())

        group = Collective(rank, world, lambda name: dist.barrier(), any_rank)
    spec = StoreSpec(views=2, seed=3, chunk_size=4)  # 6 chunks
    folder, _ = open_or_build(root, builder(model, dataset, spec, augmented=True), group)
    return folder, calls["n"]


def worker(rank: int, port: int, root: str, counts: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _, calls = build_store(Path(root), rank, WORLD)
        counts[rank] = calls
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_build_the_same_store_as_one(tmp_path):
    from mmkd.store import TeacherStore

    alone, calls_alone = build_store(tmp_path / "one")
    counts = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), str(tmp_path / "two"), counts), nprocs=WORLD)
    together = next((tmp_path / "two").iterdir())
    assert together.name == alone.name  # same key: the same teacher, data and settings
    one, two = TeacherStore.open(alone), TeacherStore.open(together)
    for name in ("embedding", "logits", "present", "id_hash", "row"):
        assert np.array_equal(one.arrays[name], two.arrays[name]), name
    # 6 chunks x 2 views x 1 batch each, split 3 + 3 (+ a shape probe per process)
    assert calls_alone == 12 + 1 and dict(counts) == {0: 6 + 1, 1: 6 + 1}
