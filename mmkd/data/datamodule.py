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

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.utilities import move_data_to_device
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from mmkd.adapters.base import Preprocessor
from mmkd.data.base import (
    DatasetSplits,
    DataSettings,
    RawSample,
    Skipped,
    limit,
    sample_ids,
    typed_data,
)
from mmkd.data.decode_cache import decoded
from mmkd.data.resume import ResumableLoader
from mmkd.data.tokens import dataset_texts
from mmkd.data.webdataset import ShardStream, StreamLoader
from mmkd.data.workers import LoaderSettings, loader_settings
from mmkd.errors import DataError
from mmkd.losses.base import IGNORE_LABEL
from mmkd.replay import ViewPolicy, replay_scope, view_seed

log = logging.getLogger(__name__)


class RoleCollate:
    """Preprocess every raw sample once per role and batch the results: a role whose
    preprocessor can take the whole batch at once (`Preprocessor.prepare_batch`, given each
    sample's view seed) does, the others preprocess sample by sample; both give the same batch.

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
        warn_skips: bool = True,
        batched: bool = True,
    ) -> None:
        self.warn_skips = warn_skips  # False: the caller reports batch["skipped_ids"] itself
        self.preprocessors = dict(preprocessors)
        self.train = train
        self.keep_labels = keep_labels
        self.num_classes = num_classes
        self.on_error = on_error
        self.replay_seed = replay_seed  # training: augment in replay_scope(seed, id, view)
        self.batched = batched  # False: every sample preprocessed alone (prepare_batch unused)

    def check(self, sample: RawSample) -> None:
        """DataError when the sample lacks a modality a role reads or its label is out of range."""
        for role, pre in self.preprocessors.items():
            if pre.modality not in sample:
                raise DataError(f"has no {pre.modality!r} (needed by {role})")
        label = sample.get("label")
        if label is not None and self.num_classes and not 0 <= label < self.num_classes:
            raise DataError(f"label {label} is outside the {self.num_classes} classes")

    def replayed(self, pre: Preprocessor) -> bool:
        return self.train and self.replay_seed is not None and pre.randomized_in_training

    def transform(self, role: str, sample: RawSample) -> Any:
        """One role's input for one sample (augmented in its replay scope when training)."""
        pre = self.preprocessors[role]
        raw = sample[pre.modality]
        if self.replayed(pre):
            with replay_scope(self.replay_seed, sample["id"], sample.get("view", 0)):  # type: ignore[arg-type]
                return pre(raw, train=True)
        return pre(raw, train=self.train)

    def prepare(self, sample: RawSample) -> dict[str, Any]:
        self.check(sample)
        return {role: self.transform(role, sample) for role in self.preprocessors}

    def reject(self, sample: RawSample, err: DataError, reasons: list[tuple[str, str]]) -> None:
        """Raise `err` naming the sample, or record it in `reasons` (on_error=skip)."""
        name = sample.get("id")
        if sample.get("where"):
            name = f"{name} ({sample['where']})"
        if self.on_error != "skip":
            raise DataError(f"sample {name}: {err}") from None
        reasons.append((str(name), str(err)))

    def __call__(self, samples: list[RawSample | Skipped]) -> dict[str, Any]:
        kept: list[RawSample] = []
        skipped = 0
        reasons: list[tuple[str, str]] = []
        for sample in samples:
            if isinstance(sample, Skipped):
                reasons.append((sample.id, sample.reason))
                skipped += 1
                continue
            try:
                self.check(sample)
            except DataError as err:
                self.reject(sample, err, reasons)
                skipped += 1
                continue
            kept.append(sample)
        inputs: dict[str, Any] = {}
        for role, pre in self.preprocessors.items():  # whole batches where the role can
            if kept and self.batched:
                seeds = None
                if self.replayed(pre):
                    seeds = [
                        view_seed(self.replay_seed, s["id"], s.get("view", 0))  # type: ignore[arg-type]
                        for s in kept
                    ]
                batch = pre.prepare_batch(
                    [s[pre.modality] for s in kept], train=self.train, seeds=seeds
                )
                if batch is not None:
                    inputs[role] = batch
        per_sample = [role for role in self.preprocessors if role not in inputs]
        if per_sample:
            prepared: list[dict[str, Any]] = []
            rows: list[int] = []
            for row, sample in enumerate(kept):
                try:
                    prepared.append({role: self.transform(role, sample) for role in per_sample})
                except DataError as err:
                    self.reject(sample, err, reasons)
                    skipped += 1
                    continue
                rows.append(row)
            if len(rows) < len(kept):  # drop the failed samples from the batched roles too
                index = torch.tensor(rows, dtype=torch.long)
                inputs = {r: {k: v[index] for k, v in b.items()} for r, b in inputs.items()}
                kept = [kept[row] for row in rows]
                if not kept:
                    inputs = {r: {} for r in inputs}
            for role in per_sample:
                pre = self.preprocessors[role]
                inputs[role] = pre.collate([p[role] for p in prepared]) if prepared else {}
        if self.warn_skips:
            for name, reason in reasons:
                log.warning("skipped sample %s: %s", name, reason)
        batch: dict[str, Any] = {
            "inputs": {role: inputs[role] for role in self.preprocessors},
            "ids": [s["id"] for s in kept],
            "skipped": skipped,
            "skipped_ids": reasons,
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
    started: tuple[int, int] = (0, 0)  # (epoch, batches skipped) of the current pass

    def __init__(
        self,
        sampler: Any,
        batch_size: int,
        policy: ViewPolicy,
        size: int,
        lengths: list[int] | None = None,
        pending: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.policy = policy
        self.size = size
        # asked for a resume point when a pass starts without one (an init argument: Lightning
        # rebuilds the batch sampler from them when it injects its distributed sampler)
        self.pending = pending
        self.lengths = lengths  # per sample: batches of similar lengths (data.bucket_by_length)

    def __len__(self) -> int:
        batches = super().__len__()
        return batches - 1 if self._folds_last() else batches

    def _folds_last(self) -> bool:
        """Whether the epoch's last batch would hold one sample: batch norm cannot train on one
        (its variance is undefined), so that sample joins the batch before it instead."""
        return len(self.sampler) % self.batch_size == 1 and len(self.sampler) > 1

    def batches(self, epoch: int) -> Iterator[list[int]]:
        batches = list(self._batches(epoch))
        if self._folds_last():
            single = min(range(len(batches)), key=lambda i: len(batches[i]))
            lone = batches.pop(single)
            batches[single - 1 if single else 0].extend(lone)
        yield from batches

    def _batches(self, epoch: int) -> Iterator[list[int]]:
        if self.lengths is None:
            yield from super().__iter__()
            return
        # length buckets: the epoch's shuffled order in pools of 50 batches, each pool sorted
        # by length and cut into batches, the batches shuffled; all seeded by (seed, epoch)
        order = list(self.sampler)
        pool = 50 * self.batch_size
        batches = []
        for start in range(0, len(order), pool):
            part = sorted(order[start : start + pool], key=lambda i: self.lengths[i])
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        seed = getattr(self.sampler, "seed", 0)
        shuffled = torch.randperm(
            len(batches), generator=torch.Generator().manual_seed(seed + epoch)
        )
        yield from (batches[i] for i in shuffled.tolist())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        resume, self.resume = self.resume, None
        if resume is None and self.pending is not None:
            resume = self.pending()
        if resume is not None and hasattr(self.sampler, "set_epoch"):
            # the first pass after a restart can start before Lightning sets the sampler's
            # epoch (loader workers draw their indices at once): take it from the resume point
            epoch, done = resume
            resume = (epoch + 1, 0) if done >= len(self) else resume
            self.sampler.set_epoch(resume[0])
        epoch = getattr(self.sampler, "epoch", 0)
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        self.started = (epoch, skip)
        views = self.policy.views_for(epoch, self.size)
        for position, batch in enumerate(self.batches(epoch)):
            if position >= skip:
                yield [(index, int(views[index])) for index in batch]


def is_plain_list(value: Any) -> bool:
    """A list or tuple holding no tensor (ids, views, skip reasons): nothing to move."""
    return isinstance(value, (list, tuple)) and not any(
        isinstance(item, torch.Tensor) for item in value
    )


class SampledLoader(ResumableLoader):
    """The training loader of a map-style split: its `ResumableBatchSampler` rebuilds the
    epoch's order and skips the batches already done."""

    batch_sampler: ResumableBatchSampler

    def pass_start(self) -> tuple[int, int]:
        return self.batch_sampler.started

    def __iter__(self) -> Iterator[Any]:
        if self.resume is not None:  # from load_state_dict; read when the pass draws a batch
            self.batch_sampler.resume = self.take_resume()
        return super().__iter__()


class DistillDataModule(pl.LightningDataModule):
    """Train / val / test loaders over `splits`, preprocessed per role.

    `fit_preprocessors` serve training and validation (no teacher input when its outputs are
    cached); `test_preprocessors` serve the test split (every model)."""

    def __init__(
        self,
        data: DataSettings,
        splits: DatasetSplits,
        fit_preprocessors: Mapping[str, Preprocessor],
        test_preprocessors: Mapping[str, Preprocessor],
        seed: int = 0,
        views: ViewPolicy | None = None,
        token_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        """`data`: the run's data settings, typed (`DataCfg` with its dataset's sections; a config
        node of that schema is converted)."""
        super().__init__()
        self.cfg = typed_data(data)
        cfg = self.cfg
        self.token_cache_dir = token_cache_dir  # None: texts are tokenised in memory only
        self._warmed: set[tuple[int, int]] = set()
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
        self._decode_once()
        self._loader_settings: LoaderSettings | None = None

    def _decode_once(self) -> None:
        """Swap each map-style split for its decode-cache entry (data.decode_cache); val and
        test, often the same samples, share one entry."""
        done: dict[int, Dataset] = {}
        for split in ("train", "val", "test"):
            dataset = getattr(self, f"{split}_set")
            if isinstance(dataset, ShardStream):
                continue
            if id(dataset) not in done:
                done[id(dataset)] = decoded(dataset, self.cfg, split)
            setattr(self, f"{split}_set", done[id(dataset)])

    @property
    def loader_settings(self) -> LoaderSettings:
        """Workers and pinned memory, chosen once (mmkd.data.workers) and logged."""
        if self._loader_settings is None:
            trainer = self.trainer
            cuda = (
                isinstance(trainer.accelerator, CUDAAccelerator)
                if trainer is not None
                else torch.cuda.is_available()
            )
            train, collate = self.train_set, self._collate(train=True)
            # a stream cannot be probed: 0 workers unless data.num_workers says otherwise
            size = 0 if isinstance(train, ShardStream) else len(train)  # type: ignore[arg-type]
            viewed = ViewedDataset(train)
            self._loader_settings = loader_settings(
                self.cfg.num_workers,
                lambda indices: collate([viewed[(i, 0)] for i in indices]),
                size,
                self.cfg.batch_size,
                cuda,
            )
        return self._loader_settings

    @property
    def num_workers(self) -> int:
        return self.loader_settings.num_workers

    @property
    def eval_batch_size(self) -> int:
        return self.cfg.eval_batch_size or self.cfg.batch_size

    def identity(self, split: str = "train") -> dict[str, Any]:
        """What determines the samples of `split` (keys the teacher store): the data settings
        and a digest of the split's sample ids (which covers subsets and holdouts, so run.seed
        only matters when it changes which samples are in the split)."""
        data = dataclasses.asdict(self.cfg)
        not_content = (
            "batch_size",
            "eval_batch_size",
            "num_workers",
            "on_error",
            "train_labels",
            "decode_cache",
            "decode_cache_dir",
            "decode_cache_max_gb",
            "bucket_by_length",
            "check_eval_data",
        )
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

    def warm_tokens(self, dataset: Dataset, test: bool = False) -> list[str] | None:
        """Tokenise the split's texts once per text preprocessor (mmkd.data.tokens), before
        its loader starts; returns the texts (None when the dataset cannot list them)."""
        texts = dataset_texts(dataset)
        if texts is None:
            return None
        present = [text for text in texts if text]
        for role, pre in (self.test_preprocessors if test else self.fit_preprocessors).items():
            warm = getattr(pre, "warm", None)
            if warm is None or (id(dataset), id(pre)) in self._warmed:
                continue
            hit = warm(present, self.token_cache_dir)
            self._warmed.add((id(dataset), id(pre)))
            log.info(
                "%s: %d texts tokenised (%s)",
                role,
                len(present),
                "cache hit" if hit else "cache miss",
            )
        return texts

    def _loader(self, dataset: Dataset, train: bool, test: bool = False) -> DataLoader:
        """The loader of a split: a stream splits itself by rank and worker; a map-style split
        is shuffled by (run.seed, epoch) and sharded by a sampler when training. Training
        loaders are resumable (`ResumableLoader`: Lightning saves their place in checkpoints)."""
        self.warm_tokens(dataset, test)
        if self.num_workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if isinstance(dataset, ShardStream):
            return self._stream_loader(dataset, train, test)
        if not train:
            return self._map_loader(dataset, train, test, batch_size=self.eval_batch_size)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        size = len(dataset)  # type: ignore[arg-type]
        lengths = self.text_lengths() if self.cfg.bucket_by_length else None
        batches = ResumableBatchSampler(
            sampler, self.cfg.batch_size, self.views, size, lengths, pending=self._take_resume
        )
        return self._map_loader(ViewedDataset(dataset), train, test, batch_sampler=batches)

    def _map_loader(
        self, dataset: Dataset, train: bool, test: bool = False, **sampling: Any
    ) -> DataLoader:
        workers = self.num_workers
        loader = SampledLoader if train else DataLoader
        return loader(
            dataset,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.loader_settings.pin_memory,
            collate_fn=self._collate(train, test),
            # a loader's iterator draws its workers' base seed from this generator; from the
            # global one, the draw (once per epoch, or once per run with persistent workers)
            # would shift the training randomness (dropout) with the worker count, and a
            # resumed run would draw where the run it continues did not
            generator=torch.Generator().manual_seed(self.seed),
            **sampling,
        )

    def _stream_loader(self, stream: ShardStream, train: bool, test: bool = False) -> DataLoader:
        """A streamed split (webdataset): the stream splits itself by rank and worker and pads
        the parts so every rank runs as many batches; the test split is read whole, once."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer and not test else (1, 0)
        configured = stream.configured(
            rank=rank,
            world=world,
            workers=self.num_workers,
            batch_size=self.cfg.batch_size if train else self.eval_batch_size,
            shuffle=train,
            pad=not test,
        )
        return StreamLoader(
            configured,
            epoch_of=lambda: trainer.current_epoch if trainer else 0,
            pending=self._take_resume if train else None,
            num_workers=self.num_workers,
            collate_fn=self._collate(train, test),
        )

    def train_dataloader(self) -> DataLoader:
        """Any epoch's order can be rebuilt after a restart; the loader skips the batches the
        interrupted epoch had done (`ResumableLoader`)."""
        return self._loader(self.train_set, train=True)

    def _take_resume(self) -> tuple[int, int] | None:
        resume, self._resume_at = self._resume_at, None
        return resume

    def text_lengths(self) -> list[int] | None:
        """Token count of every training text, by the first text preprocessor (for length
        buckets); None (with a warning) when the split has no listable texts."""
        texts = self.warm_tokens(self.train_set)
        pre = next((p for p in self.fit_preprocessors.values() if hasattr(p, "tokens")), None)
        if texts is None or pre is None:
            log.warning("data.bucket_by_length: no tokenised texts in this split; not bucketed")
            return None
        return [len(pre.tokenize(text)) if text else 0 for text in texts]

    def state_dict(self) -> dict[str, Any]:
        """The training loader's place in the epoch (mmkd.data.resume says why it is kept here
        as well as with the loader)."""
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        return {"train_loader": loader.state_dict()} if isinstance(loader, ResumableLoader) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """For the next training loader; checkpoints saved before the loaders kept their place
        hold the same two fields at the top level."""
        place = state.get("train_loader", state)
        if place:
            self._resume_at = (int(place["epoch"]), int(place["batches_done"]))

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move the batch's tensors; its lists of sample ids, views and skip reasons stay as
        they are. Lightning's generic walk visits every id string of every batch: about 1 % of a
        CIFAR ResNet-8 training step on 2 CPU cores (benchmarks/overhead.py cifar)."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {
            key: value if is_plain_list(value) else move_data_to_device(value, device)
            for key, value in batch.items()
        }

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False, test=True)
