"""Where the teacher's outputs for a batch come from: a live forward pass, or the teacher store.

`DistillModule` only asks `source.targets(batch, split)`; a stored source owns building and
opening the store (every process builds its share of the chunks, then reads it memory-mapped),
which the `BuildTeacherStores` callback triggers when fitting starts, and says which augmented
view each training sample must be replayed as (`view_policy`).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import IterableDataset

from mmkd.adapters import Adapter
from mmkd.errors import ConfigError
from mmkd.losses import FeatureTarget
from mmkd.replay import ViewPolicy
from mmkd.roles import SHORTHAND, student_slot, teacher_slot
from mmkd.store import (
    Collective,
    StoreBuilder,
    StoreSpec,
    TeacherStore,
    TeacherTargets,
    data_content,
    open_or_build,
    teacher_collate,
    teacher_outputs,
)
from mmkd.store.build import keep_going

log = logging.getLogger(__name__)


class LiveTeacher:
    """Runs the frozen teacher on the batch's own teacher input (same view as the student)."""

    needs_input = True  # the fit loaders preprocess the teacher's input

    def __init__(
        self,
        teacher: Adapter,
        run_seed: int,
        role: str = "teacher",
        features: tuple[FeatureTarget, ...] = (),
    ) -> None:
        self.teacher = teacher
        self.run_seed = run_seed
        self.role = role
        self.features = features

    def view_policy(self) -> ViewPolicy:
        return ViewPolicy(seed=self.run_seed)  # a new view every epoch

    @torch.no_grad()
    def targets(self, batch: dict[str, Any], split: str) -> TeacherTargets:
        return teacher_outputs(self.teacher, batch["inputs"][self.role], self.features)


class StoredTeacher:
    """Reads the teacher's outputs from the store: K augmented views of every training sample
    (one when the teacher's input is not augmented) and one unaugmented view of validation."""

    needs_input = False

    def __init__(
        self,
        teacher: Adapter,
        store: Any,
        *,
        run_seed: int,
        cache_dir: str | Path | None,
        name: str = "teacher",
        features: tuple[FeatureTarget, ...] = (),
    ) -> None:
        """`store`: the store settings (`distill.store`, its dataclass); `cache_dir`: the folder
        stores live in (None: none was given, and setup refuses to build)."""
        self.teacher = teacher
        self.settings = store
        self.run_seed = run_seed
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.name = name
        self.slot = teacher_slot(name)
        self.augmented = teacher.make_preprocessor().randomized_in_training
        views = store.views or 1
        if views > 1 and not self.augmented:
            log.info(
                "distill.store.views=%d: the teacher's input is not augmented, so every "
                "view would be the same; storing one",
                views,
            )
            views = 1
        self.spec = StoreSpec(
            views=views,
            seed=store.seed,
            dtype=store.dtype,
            logits_topk=store.logits_topk,
            chunk_size=store.chunk_size,
            max_gb=store.max_gb,
            features=features,
        )
        self.stores: dict[str, TeacherStore] = {}
        self.build_seconds: dict[str, float] = {}

    def view_policy(self) -> ViewPolicy:
        if not self.augmented:  # the stored output fits every view: augment afresh each epoch
            return ViewPolicy(seed=self.run_seed)
        return ViewPolicy(
            seed=self.settings.seed,
            views=self.spec.views,
            order=self.settings.view_order,
            draw_seed=self.run_seed,
        )

    def setup(
        self,
        trainer: pl.Trainer,
        datamodule: Any,
        device: torch.device,
        check_stop: Callable[[], None] = keep_going,
    ) -> None:
        """Build (every process its share of the chunks, the teacher on `device`) or find, then
        open, the train and val entries of `datamodule`'s splits (`check_stop`: see
        `StoreBuilder`)."""
        if self.cache_dir is None:
            raise ValueError("StoredTeacher.setup: no cache_dir was given to keep the store in")
        data = datamodule.cfg  # the run's data settings
        for split, dataset in (("train", datamodule.train_set), ("val", datamodule.val_set)):
            if isinstance(dataset, IterableDataset):
                raise ConfigError(
                    f"distill.store: the {split} split is streamed (data.name="
                    f"{data.name}); the teacher store needs map-style data. Use the live "
                    "teacher (distill.store.views=null, distill.cache=false)."
                )
            train = split == "train" and self.augmented
            spec = self.spec if train else StoreSpec(**{**vars(self.spec), "views": 1})
            collate = teacher_collate(
                self.teacher.make_preprocessor(),
                augmented=train,
                seed=spec.seed,
                on_error=data.on_error,
            )
            builder = StoreBuilder(
                self.teacher,
                dataset,
                collate,
                {**datamodule.identity(split), "content": data_content(dataset)},
                spec,
                augmented=train,
                batch_size=datamodule.eval_batch_size,
                device=device,
                num_workers=datamodule.num_workers,
                label=f" ({split})" if self.slot.name == SHORTHAND else f" ({self.name}, {split})",
                check_stop=check_stop,
            )
            folder, seconds = open_or_build(self.cache_dir, builder, collective(trainer))
            self.stores[split] = TeacherStore.open(folder, verify=False)  # verified just now
            if seconds is not None:
                self.build_seconds[split] = seconds
        if self.build_seconds:
            total = sum(self.build_seconds.values())
            metric = f"time/{self.slot.metric_prefix}store_build_s"
            for logger in trainer.loggers:  # every logger, not only the first
                logger.log_metrics({metric: total}, step=0)

    def targets(self, batch: dict[str, Any], split: str) -> TeacherTargets:
        views = batch.get("views") if split == "train" and self.augmented else None
        return self.stores[split].lookup(batch["ids"], views, device=self.teacher_device)

    @property
    def teacher_device(self) -> torch.device:
        return next(self.teacher.parameters()).device


TeacherSource = LiveTeacher | StoredTeacher


class BuildTeacherStores(pl.Callback):
    """Builds or opens the stores of `stores` when fitting starts: the teacher is then on the
    training device and the processes can meet at a barrier (not yet in the DataModule's
    `setup`)."""

    def __init__(self, stores: list[StoredTeacher]) -> None:
        self.stores = stores

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with StopOnSigterm() as stop:
            for store in self.stores:
                store.setup(trainer, trainer.datamodule, pl_module.device, stop.check)


class StopOnSigterm:
    """While the stores build, SIGTERM stops the build at its next batch and the run as it stops
    mid-epoch (Lightning's SIGTERMException: a checkpoint, exit 143). Lightning installs its own
    handler only after `on_fit_start`, so without this a SIGTERM kills the process outright, with
    no checkpoint and no message. Finished chunks are kept either way."""

    def __init__(self) -> None:
        self.received = False
        self.previous: Any = None

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():  # signals reach only it
            self.previous = signal.signal(signal.SIGTERM, self.record)
        return self

    def record(self, signum: int, frame: Any) -> None:
        self.received = True

    def check(self) -> None:
        if self.received:
            raise SIGTERMException

    def __exit__(self, kind: Any, err: Any, trace: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if err is None:
            self.check()  # a signal that came after the last check


def collective(trainer: pl.Trainer) -> Collective:
    """The trainer's processes, as the store builds with them."""
    strategy = trainer.strategy
    return Collective(
        rank=trainer.global_rank,
        world=trainer.world_size,
        barrier=strategy.barrier,
        any=lambda flag: bool(strategy.reduce_boolean_decision(flag, all=False)),
    )


def stores_dir(cache_dir: str | None, run_dir: str | Path | None) -> Path | None:
    """Where a run's stores (and token caches) live: `cache_dir` (distill.cache_dir), else
    RUN_DIR/teacher_cache; None when neither is known yet."""
    if cache_dir:
        return Path(cache_dir)
    return None if run_dir is None else Path(run_dir) / "teacher_cache"


def make_teacher_source(
    teacher: Adapter | None,
    distill: Any,
    *,
    run_seed: int,
    cache_dir: str | Path | None = None,
    name: str = "teacher",
    features: tuple[FeatureTarget, ...] = (),
) -> TeacherSource | None:
    """The store when `distill` (the `distill` settings, its dataclass) asks for one
    (store.views, or the older cache), kept under `cache_dir`, else the live teacher; None
    without a teacher. `features`: the teacher layers the terms read."""
    if teacher is None:
        return None
    if distill.store.views is not None or distill.cache:
        return StoredTeacher(
            teacher,
            distill.store,
            run_seed=run_seed,
            cache_dir=cache_dir,
            name=name,
            features=features,
        )
    return LiveTeacher(teacher, run_seed, teacher_slot(name).role, features)


def check_same_views(teachers: dict[str, Adapter], students: dict[str, Adapter]) -> None:
    """A teacher whose training input is augmented sees view v of a sample; a student of the same
    modality must draw the same view (the same settings), or it learns the teacher's outputs on
    other inputs. Compared where both preprocessors say their settings (text views)."""
    for name, teacher in teachers.items():
        settings = teacher.make_preprocessor().augmentation()
        if not settings:
            continue
        teacher_key = teacher_slot(name).key
        for role, student in students.items():
            theirs = student.make_preprocessor().augmentation()
            if student.modality == teacher.modality and theirs is not None and theirs != settings:
                student_key = student_slot(role).key
                raise ConfigError(
                    f"{student_key}: its training views ({theirs or 'none'}) differ from "
                    f"{teacher_key}'s ({settings}); give both the same augmentation settings "
                    "(e.g. the same text.augment), so the student reads the view the teacher saw"
                )


def check_student_views(sources: list[TeacherSource], students: dict[str, Adapter]) -> None:
    """One warning per student of a stored augmented teacher's modality whose preprocessing
    differs from the teacher's: it replays the stored views' random draws through other
    settings, so it trains on views the teacher never saw (intended, e.g., for a student with
    its own input size; otherwise set the same values, or use the live teacher)."""
    for source in sources:
        if not (isinstance(source, StoredTeacher) and source.augmented):
            continue
        stored = source.teacher.make_preprocessor().identity()
        for role, student in students.items():
            if student.modality != source.teacher.modality:
                continue
            own = student.make_preprocessor().identity()
            if own == stored:
                continue
            a, b = own.get("settings", {}), stored.get("settings", {})
            keys = sorted(k for k in {*a, *b} if a.get(k) != b.get(k)) or ["class"]
            diff = ", ".join(f"{k}={a.get(k)!r} (stored views: {b.get(k)!r})" for k in keys)
            log.warning(
                "%s: its preprocessing differs from the views stored for teacher %s (%s): it "
                "trains on views that teacher never saw; use the same settings, or the live "
                "teacher (distill.store.views=null)",
                role,
                source.name,
                diff,
            )


def fit_view_policy(sources: list[TeacherSource], run_seed: int) -> ViewPolicy:
    """Which augmented view each training sample is read as: the stored views of an augmented
    teacher store (every store of a run shares distill.store's views and seed), else a fresh
    view every epoch (a live teacher sees the student's view, whatever it is)."""
    for source in sources:
        if isinstance(source, StoredTeacher) and source.augmented:
            return source.view_policy()
    return ViewPolicy(seed=run_seed)
