"""Batching for several models at once, and the LightningDataModule.

Each model (a *role*: "teacher", "student", "extra_students.NAME") gets its own preprocessing of
the modality it reads, so a batch holds one input per role:

    {"inputs": {role: {...tensors...}}, "labels": LongTensor (absent when withheld),
     "ids": [sample ids], "views": [view index of each sample] (training), "skipped": int}

In training, a dataset with classes gives every batch labels, IGNORE_LABEL (-100) for a row
without one (a transfer set mixed into the labelled rows): label terms skip those rows.

Training samples are augmented reproducibly: the batch sampler gives each sample a view index
(`mmkd.replay.ViewPolicy`) and every role's random transforms run inside
`replay_scope(seed, sample id, view)`, so roles of the same modality and settings see the same
augmented view, and a stored teacher output can be matched with the student's view.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from mmkd.adapters.base import Preprocessor
from mmkd.data.base import DatasetSplits, RawSample, Skipped, limit, sample_ids
from mmkd.data.webdataset import ShardStream, StreamLoader
from mmkd.errors import DataError
from mmkd.losses.base import IGNORE_LABEL
from mmkd.replay import ViewPolicy, replay_scope

log = logging.getLogger(__name__)


class RoleCollate:
    """Preprocess every raw sample once per role and batch the results.

    A sample that fails (missing modality, undecodable input, label outside the class set)
    raises `DataError` naming the sample (and its "where", e.g. a manifest row, when it has one),
    or is dropped and counted under on_error=skip.
    """

    def __init__(
        self,
        preprocessors: Mapping[str, Preprocessor],
        *,
        train: bool,
        keep_labels: bool,
        num_classes: int,
        on_error: str = "raise",
        replay_seed: int | None = None,
    ) -> None:
        self.preprocessors = dict(preprocessors)
        self.train = train
        self.keep_labels = keep_labels
        self.num_classes = num_classes
        self.on_error = on_error
        self.replay_seed = replay_seed  # training: augment in replay_scope(seed, id, view)

    def prepare(self, sample: RawSample) -> dict[str, Any]:
        out = {}
        for role, pre in self.preprocessors.items():
            if pre.modality not in sample:
                raise DataError(f"has no {pre.modality!r} (needed by {role})")
            raw = sample[pre.modality]
            if self.train and self.replay_seed is not None and pre.randomized_in_training:
                with replay_scope(self.replay_seed, sample["id"], sample.get("view", 0)):
                    out[role] = pre(raw, train=True)
            else:
                out[role] = pre(raw, train=self.train)
        label = sample.get("label")
        if label is not None and self.num_classes and not 0 <= label < self.num_classes:
            raise DataError(f"label {label} is outside the {self.num_classes} classes")
        return out

    def __call__(self, samples: list[RawSample | Skipped]) -> dict[str, Any]:
        prepared: list[dict[str, Any]] = []
        kept: list[RawSample] = []
        skipped = 0
        for sample in samples:
            if isinstance(sample, Skipped):
                log.warning("skipped sample %s: %s", sample.id, sample.reason)
                skipped += 1
                continue
            try:
                prepared.append(self.prepare(sample))
            except DataError as err:
                name = sample.get("id")
                if sample.get("where"):
                    name = f"{name} ({sample['where']})"
                if self.on_error != "skip":
                    raise DataError(f"sample {name}: {err}") from None
                log.warning("skipped sample %s: %s", name, err)
                skipped += 1
                continue
            kept.append(sample)
        batch: dict[str, Any] = {
            "inputs": {
                role: pre.collate([p[role] for p in prepared]) if prepared else {}
                for role, pre in self.preprocessors.items()
            },
            "ids": [s["id"] for s in kept],
            "skipped": skipped,
        }
        if any("view" in s for s in kept):
            batch["views"] = [s.get("view", 0) for s in kept]
        labels = [s.get("label") for s in kept]
        if self.keep_labels and kept and all(label is not None for label in labels):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        elif self.keep_labels and kept and self.train and self.num_classes:
            # unlabelled rows among labelled ones (a transfer set): label terms skip them
            labels = [IGNORE_LABEL if label is None else label for label in labels]
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


class ViewedDataset(Dataset):
    """`dataset[(index, view)]`: the sample at `index`, marked with the view to augment it as."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> RawSample | Skipped:
        index, view = key
        sample = self.dataset[index]
        return sample if isinstance(sample, Skipped) else {**sample, "view": view}


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler over an epoch-seeded sampler that, after a restart, skips the batches the
    interrupted epoch already trained on (index-level: no sample is loaded for nothing). Each
    index comes with its view in that epoch: batches are lists of (index, view)."""

    resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

    def __init__(self, sampler: Any, batch_size: int, policy: ViewPolicy, size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.policy = policy
        self.size = size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        resume, self.resume = self.resume, None
        epoch = getattr(self.sampler, "epoch", 0)
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        views = self.policy.views_for(epoch, self.size)
        for position, batch in enumerate(super().__iter__()):
            if position >= skip:
                yield [(index, int(views[index])) for index in batch]


class DistillDataModule(pl.LightningDataModule):
    """Train / val / test loaders over `splits`, preprocessed per role.

    `fit_preprocessors` serve training and validation (no teacher input when its outputs are
    cached); `test_preprocessors` serve the test split (every model)."""

    def __init__(
        self,
        cfg: DictConfig,
        splits: DatasetSplits,
        fit_preprocessors: Mapping[str, Preprocessor],
        test_preprocessors: Mapping[str, Preprocessor],
        seed: int = 0,
        views: ViewPolicy | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.splits = splits
        self.fit_preprocessors = dict(fit_preprocessors)
        self.test_preprocessors = dict(test_preprocessors)
        self.seed = seed
        self.views = views or ViewPolicy(seed=seed)  # default: a new view every epoch
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) after a restart
        for split in (splits.train, splits.val, splits.test):
            if isinstance(split, ShardStream):  # streams shuffle their shards by run.seed
                split.seed = seed
        subset_seed = seed if cfg.subset_seed is None else cfg.subset_seed
        self.train_set = limit(splits.train, cfg.max_train_samples, subset_seed)
        self.val_set = limit(splits.val, cfg.max_eval_samples, subset_seed)
        self.test_set = limit(splits.test, cfg.max_eval_samples, subset_seed)

    @property
    def eval_batch_size(self) -> int:
        return self.cfg.eval_batch_size or self.cfg.batch_size

    def identity(self, split: str = "train") -> dict[str, Any]:
        """What determines the samples of `split` (keys the teacher store): the data settings
        and a digest of the split's sample ids (which covers subsets and holdouts, so run.seed
        only matters when it changes which samples are in the split)."""
        data = OmegaConf.to_container(self.cfg, resolve=True)
        assert isinstance(data, dict)
        not_content = ("batch_size", "eval_batch_size", "num_workers", "on_error", "train_labels")
        for key in (*not_content, "max_train_samples", "max_eval_samples", "subset_seed"):
            data.pop(key, None)
        ids = sample_ids(self.train_set if split == "train" else self.val_set)
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        return {"data": data, "split": split, "size": len(ids), "ids_sha256": digest}

    def _collate(self, train: bool, test: bool = False) -> RoleCollate:
        return RoleCollate(
            self.test_preprocessors if test else self.fit_preprocessors,
            train=train,
            keep_labels=self.cfg.train_labels or not train,
            num_classes=self.splits.num_classes,
            on_error=self.cfg.on_error,
            replay_seed=self.views.seed,
        )

    def _loader(
        self, dataset: Dataset, train: bool, test: bool = False, **sampling: Any
    ) -> DataLoader:
        workers = self.cfg.num_workers
        if workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not sampling:
            sampling = {"batch_size": self.cfg.batch_size if train else self.eval_batch_size}
        return DataLoader(
            dataset,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=self._collate(train, test),
            **sampling,
        )

    def _stream_loader(self, stream: ShardStream, train: bool, test: bool = False) -> DataLoader:
        """A streamed split (webdataset): the stream splits itself by rank and worker and pads
        the parts so every rank runs as many batches; the test split is read whole, once."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer and not test else (1, 0)
        resume = None
        if train:
            resume, self._resume_at = self._resume_at, None
        workers = self.cfg.num_workers
        if workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        configured = stream.configured(
            rank=rank,
            world=world,
            workers=workers,
            batch_size=self.cfg.batch_size if train else self.eval_batch_size,
            shuffle=train,
            pad=not test,
        )
        return StreamLoader(
            configured,
            epoch_of=lambda: trainer.current_epoch if trainer else 0,
            resume=resume,
            num_workers=workers,
            collate_fn=self._collate(train, test),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (run.seed, epoch) and sharded across processes, so any epoch's order can
        be rebuilt after a restart; `load_state_dict` makes it skip the batches already done."""
        if isinstance(self.train_set, ShardStream):
            return self._stream_loader(self.train_set, train=True)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = DistributedSampler(
            self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        size = len(self.train_set)  # type: ignore[arg-type]
        batches = ResumableBatchSampler(sampler, self.cfg.batch_size, self.views, size)
        batches.resume, self._resume_at = self._resume_at, None
        return self._loader(ViewedDataset(self.train_set), train=True, batch_sampler=batches)

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the epoch (saved in every checkpoint)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:  # applies only if training resumes inside that same epoch
            self._resume_at = (state["epoch"], state["batches_done"])

    def val_dataloader(self) -> DataLoader:
        if isinstance(self.val_set, ShardStream):
            return self._stream_loader(self.val_set, train=False)
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if isinstance(self.test_set, ShardStream):
            return self._stream_loader(self.test_set, train=False, test=True)
        return self._loader(self.test_set, train=False, test=True)
