"""The training loader's place in the epoch travels in the checkpoint (Lightning's loader
`state_dict` / `load_state_dict`): a run stopped mid-epoch resumes bit-exact, without Lightning's
"dataloader is not resumable" warning, also from a checkpoint saved before the loaders kept it."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from tiny import resumable_run

from mmkd.config import compose
from mmkd.export import load_exported
from mmkd.train import train

OVERRIDES = [
    *resumable_run(num_train=48, num_val=8, batch_size=8),
    "data.demo.num_test=8",
    "run.test=false",
    "run.export=true",
]  # 6 steps per epoch


class Stopped(Exception):
    pass


class StopAt(pl.Callback):
    """Ends the run like a kill at `step`: the last checkpoint is the one after step - 1."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Stopped


def run(run_dir: Path, *extra: str, stop: int | None = None) -> list[str]:
    """Train (resuming with run.resume=true); the warnings' messages."""
    callbacks = [StopAt(stop)] if stop is not None else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train(compose([*OVERRIDES, f"run.dir={run_dir}", *extra]), callbacks=callbacks)
        except Stopped:
            assert stop is not None
    return [str(w.message) for w in caught]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_exported(run_dir / "student").model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_mid_epoch_resume_is_bit_exact_without_the_not_resumable_warning(tmp_path, workers):
    # with a worker, the resumed pass draws its indices before Lightning sets the epoch
    whole = tmp_path / "whole"
    run(whole, f"data.num_workers={workers}")
    stopped = tmp_path / "stopped"
    run(stopped, f"data.num_workers={workers}", stop=9)  # epoch 1, after 3 of its 6 batches
    ckpt = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 9
    place = {"epoch": 1, "batches_done": 3}
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [place]
    assert ckpt["DistillDataModule"] == {"train_loader": place}  # Lightning issue #20550
    # a checkpoint saved before the loaders kept their place: the DataModule held it
    legacy = tmp_path / "legacy"
    shutil.copytree(stopped, legacy)
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    ckpt["DistillDataModule"] = place
    (legacy / "checkpoints" / "last.ckpt.sha256").unlink()
    torch.save(ckpt, legacy / "checkpoints" / "last.ckpt")

    caught = run(stopped, "run.resume=true", f"data.num_workers={workers}")
    assert not [m for m in caught if "not resumable" in m], caught
    expected = weights(whole)
    for resumed in (stopped, legacy):
        if resumed is legacy:
            run(legacy, "run.resume=true", f"data.num_workers={workers}")
        got = weights(resumed)
        assert got.keys() == expected.keys()
        assert all(torch.equal(v, got[k]) for k, v in expected.items()), resumed.name


@pytest.mark.parametrize("lengths", [None, [3, 1, 4, 1, 5, 9, 2, 6, 5]])
def test_a_lone_last_sample_joins_the_batch_before_it(lengths) -> None:
    """9 samples in batches of 4: not [4, 4, 1] (batch norm cannot train on one sample) but
    [4, 5], every sample once, and the loader's length says 2; with length buckets too."""
    from torch.utils.data import DistributedSampler

    from mmkd.data.datamodule import ResumableBatchSampler
    from mmkd.replay import ViewPolicy

    data = list(range(9))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    batches = ResumableBatchSampler(sampler, 4, ViewPolicy(seed=0), 9, lengths)
    drawn = list(batches)
    assert sorted(len(b) for b in drawn) == [4, 5] and len(batches) == 2
    assert sorted(index for b in drawn for index, _ in b) == data
    even = ResumableBatchSampler(sampler, 3, ViewPolicy(seed=0), 9, lengths)
    assert [len(b) for b in even] == [3, 3, 3] and len(even) == 3
