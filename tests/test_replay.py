"""Replayable augmentation: view v of sample i is the same tensor in any worker, process or run,
and replaying it leaves the global random streams untouched."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny import tiny_spec
from torch.utils.data import DataLoader

from mmkd.adapters import build_adapter
from mmkd.config.schema import DemoCfg
from mmkd.data.datamodule import RoleCollate, ViewedDataset
from mmkd.data.demo import DemoDataset
from mmkd.replay import ViewPolicy, replay_scope

# timm's random-resized crop draws from `random`, its flip from torch; SpecAugment from torch
AUGMENTED = {
    "image": {"image__augment": True, "image__scale": [0.3, 1.0], "image__hflip": 0.5},
    "image_pad_crop": {"image__augment": True, "image__crop_padding": 4, "image__hflip": 0.5},
    "audio_cnn": {"audio__spec_augment": True, "audio__time_shift": 0.1, "audio__gain_db": 6.0},
    "audio_wav2vec2": {"audio__time_shift": 0.1, "audio__gain_db": 6.0},
}
KEYS = [(0, 0), (0, 1), (5, 0), (5, 3), (11, 2), (17, 1), (3, 0), (9, 4)]

VIEWS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, "tests")
    from test_replay import augmented_views
    torch.save(augmented_views(sys.argv[1], workers=0), sys.argv[2])
    """
)


def augmented_views(kind: str, workers: int) -> torch.Tensor:
    """The augmented inputs of KEYS ((index, view) pairs), loaded with `workers` workers."""
    spec = tiny_spec("image" if kind.startswith("image") else kind, **AUGMENTED[kind])
    pre = build_adapter(spec, key="student").make_preprocessor()
    assert pre.randomized_in_training
    dataset = DemoDataset(OmegaConf.structured(DemoCfg), "train", 24, 0)
    collate = RoleCollate(
        {"student": pre}, train=True, keep_labels=False, num_classes=0, replay_seed=42
    )
    loader = DataLoader(
        ViewedDataset(dataset),
        batch_sampler=[KEYS[:3], KEYS[3:]],
        num_workers=workers,
        collate_fn=collate,
    )
    return torch.cat([next(iter(b["inputs"]["student"].values())) for b in loader])


@pytest.mark.parametrize("kind", list(AUGMENTED))
def test_views_are_identical_across_worker_counts_and_processes(kind, tmp_path):
    in_process = augmented_views(kind, workers=0)
    with_workers = augmented_views(kind, workers=2)
    assert torch.equal(in_process, with_workers)
    out = tmp_path / "views.pt"
    subprocess.run([sys.executable, "-c", VIEWS_SCRIPT, kind, str(out)], check=True)
    assert torch.equal(in_process, torch.load(out))
    # and they are augmented: views of one sample differ (two may coincide by chance, e.g. the
    # same crop offset and flip, 1 in 162 for the pad-and-crop)
    distinct = {view.numpy().tobytes() for view in in_process}
    assert len(distinct) >= len(KEYS) - 1


def test_replay_leaves_the_global_random_streams_untouched():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with replay_scope(42, "sample-1", 3):
        inside = (torch.rand(3), np.random.rand(3), random.random())
    after = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(after[0], expected[0])
    assert np.array_equal(after[1], expected[1])
    assert after[2] == expected[2]
    with replay_scope(42, "sample-1", 3):
        again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(inside[0], again[0]) and np.array_equal(inside[1], again[1])
    assert inside[2] == again[2]


def test_view_policies():
    fresh = ViewPolicy(seed=0)
    assert fresh.views_for(5, 3).tolist() == [5, 5, 5]  # a new view every epoch
    cycle = ViewPolicy(seed=0, views=4)
    assert [int(cycle.views_for(e, 1)[0]) for e in range(6)] == [0, 1, 2, 3, 0, 1]
    drawn = ViewPolicy(seed=0, views=4, order="random", draw_seed=7)
    first = drawn.views_for(2, 1000)
    assert np.array_equal(first, drawn.views_for(2, 1000))  # seeded
    assert not np.array_equal(first, drawn.views_for(3, 1000))  # redrawn each epoch
    assert set(first.tolist()) == {0, 1, 2, 3}
    other_run = ViewPolicy(seed=0, views=4, order="random", draw_seed=8)
    assert not np.array_equal(first, other_run.views_for(2, 1000))
