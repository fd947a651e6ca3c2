"""The LightningModule: frozen teacher(s), trainable student(s), weighted loss terms.

Teachers are deliberately *not* registered submodules: they never reach the optimizer,
DDP/FSDP wrapping or checkpoints, and `train()` cannot switch them out of eval mode. They still
follow the module across devices and dtypes (see `_apply`).

The module runs the steps; the rest lives where it belongs: each student's loss groups are
assembled by `mmkd.losses.build_student_loss` (one `DistillLoss` per teacher and one for the
label terms; metrics `train/[ROLE/][TEACHER/]TERM`), the optimizer and schedule come from
`mmkd.optim`, and the callbacks of `configure_callbacks` build the teacher stores
(`BuildTeacherStores`) and carry the RNG state through checkpoints (`ResumeRandomState`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from mmkd.adapters import Adapter, AdapterOutput
from mmkd.adapters.base import class_scores
from mmkd.checkpoint import ResumeRandomState
from mmkd.errors import MMKDError
from mmkd.losses import (
    FeatureTarget,
    Gather,
    build_student_loss,
    distributed_gather,
    local_gather,
    typed_losses,
)
from mmkd.optim import make_optimizer, make_scheduler
from mmkd.roles import SHORTHAND, loss_sections, student_slot, teacher_slot
from mmkd.store import TeacherTargets
from mmkd.teacher_source import (
    BuildTeacherStores,
    StoredTeacher,
    TeacherSource,
    check_same_views,
    make_teacher_source,
    stores_dir,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(MMKDError):
    """A loss term became NaN or Inf and distill.nonfinite_loss=stop."""


# one group of loss terms: (config key, losses section dataclass, scope, teacher name or None)
LossGroup = tuple[str, Any, str, "str | None"]


def teacher_dict(teachers: dict[str, Adapter] | Adapter | None) -> dict[str, Adapter]:
    """Teachers by name: a single Adapter is the one-teacher shorthand's, None is none."""
    if teachers is None:
        return {}
    if isinstance(teachers, Adapter):
        return {SHORTHAND: teachers}
    return dict(teachers)


class DistillModule(pl.LightningModule):
    """Trains the student(s) against a frozen teacher (or labels) with the weighted `losses`.

    The teacher is kept outside the module's submodules: never in the optimizer, DDP or
    checkpoints, always in eval mode."""

    def __init__(
        self,
        teachers: dict[str, Adapter] | Adapter | None,
        students: dict[str, Adapter],
        loss_groups: Iterable[LossGroup],
        *,
        optim: Any,
        distill: Any,
        run_seed: int,
        cache_dir: str | Path | None = None,
        class_names: list[str] | None = None,
        class_prompts: list[str] | None = None,
    ) -> None:
        """Typed values, as `from_config` reads them from a run's config: `loss_groups` the
        (config key, losses section dataclass, scope, teacher name) of every group of terms
        (`mmkd.roles.loss_sections`), `optim` and `distill` those settings' dataclasses,
        `cache_dir` where teacher stores live (`stores_dir`)."""
        super().__init__()
        self.optim = optim
        self.distill = distill
        self.students = nn.ModuleDict(students)
        # unregistered on purpose (module docstring)
        object.__setattr__(self, "teachers", teacher_dict(teachers))
        for teacher in self.teachers.values():
            teacher.requires_grad_(False).eval()
        check_same_views(self.teachers, students)
        self.teacher_slots = {name: teacher_slot(name) for name in self.teachers}
        self.student_slots = {name: student_slot(name) for name in students}
        loss_groups = list(loss_groups)  # read once per student
        self.losses = nn.ModuleDict(
            {
                role: build_student_loss(
                    loss_groups,
                    student,
                    self.teachers,
                    self.student_slots[role],
                    self.teacher_slots,
                )
                for role, student in students.items()
            }
        )
        self.class_names = list(class_names or [])
        self.class_prompts = list(class_prompts or [])
        # zero-shot classifier: the teacher's embeddings of the class prompts (text teachers)
        self.register_buffer("class_embeddings", None, persistent=False)
        num_classes = len(self.class_names)
        self.val_accuracy = nn.ModuleDict(
            {role: MulticlassAccuracy(num_classes, average="micro") for role in students}
            if num_classes
            else {}
        )
        self.skip_step = False  # set when a non-finite loss is skipped (nonfinite_loss=skip)
        self._compiled = False
        # where each teacher's outputs come from: a live forward pass or the teacher store,
        # with the features its terms read for every student
        self.teacher_sources: dict[str, TeacherSource] = {
            name: make_teacher_source(
                teacher,
                distill,
                run_seed=run_seed,
                cache_dir=cache_dir,
                name=name,
                features=self.teacher_features(name),
            )
            for name, teacher in self.teachers.items()
        }

    @classmethod
    def from_config(
        cls,
        cfg: DictConfig,
        teachers: dict[str, Adapter] | Adapter | None,
        students: dict[str, Adapter],
        class_names: list[str] | None = None,
        class_prompts: list[str] | None = None,
    ) -> DistillModule:
        """The module of the run `cfg` (composed and validated): its losses sections, `optim`
        and `distill` as their schema's dataclasses, run.seed, and where stores live."""
        teachers = teacher_dict(teachers)
        groups = [
            (key, typed_losses(section), scope, name)
            for key, section, scope, name in loss_sections(cfg, SHORTHAND in teachers)
        ]
        return cls(
            teachers,
            students,
            groups,
            optim=OmegaConf.to_object(cfg.optim),
            distill=OmegaConf.to_object(cfg.distill),
            run_seed=cfg.run.seed,
            cache_dir=stores_dir(cfg.distill.cache_dir, cfg.run.dir),
            class_names=class_names,
            class_prompts=class_prompts,
        )

    def teacher_features(self, name: str) -> tuple[FeatureTarget, ...]:
        """The layers of teacher `name` that its terms read, for every student."""
        wanted = [target for loss in self.losses.values() for target in loss.teacher_features(name)]
        return tuple(dict.fromkeys(wanted))

    @property
    def teacher(self) -> Adapter | None:
        """The teacher, when there is exactly one."""
        return next(iter(self.teachers.values())) if len(self.teachers) == 1 else None

    def configure_model(self) -> None:
        """distill.compile_student: compile the students' forward in place (state-dict keys
        unchanged, so checkpoints and exports are the same with or without it)."""
        if self.distill.compile_student and not self._compiled:
            for student in self.students.values():
                student.compile()
            self._compiled = True

    # ------------------------------------------------------------------ teacher handling
    def teacher_used(self, name: str) -> bool:
        """Whether any loss term reads teacher `name`."""
        return any(loss.uses_teacher(name) for loss in self.losses.values())

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillModule:
        super()._apply(fn, *args, **kwargs)
        for teacher in self.teachers.values():
            teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        for teacher in self.teachers.values():
            teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Any], split: str) -> dict[str, TeacherTargets]:
        """Each used teacher's outputs for this batch, by teacher name."""
        return {
            name: source.targets(batch, split)
            for name, source in self.teacher_sources.items()
            if self.teacher_used(name)
        }

    @torch.no_grad()
    def compute_class_embeddings(self) -> None:
        """Embed the class prompts with a text teacher, for zero-shot classification."""
        text = [t for t in self.teachers.values() if t.modality == "text"]
        if not text or not self.class_prompts:
            return
        pre = text[0].make_preprocessor()
        batch = pre.collate([pre(p, train=False) for p in self.class_prompts])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.class_embeddings = text[0](batch).embedding.float()

    def on_fit_start(self) -> None:
        self.compute_class_embeddings()

    def configure_callbacks(self) -> list[pl.Callback]:
        """What fitting this module needs besides the steps: its RNG state in checkpoints, and
        the stores of its used stored teachers built when fitting starts."""
        stores = [
            source
            for name, source in self.teacher_sources.items()
            if isinstance(source, StoredTeacher) and self.teacher_used(name)
        ]
        return [ResumeRandomState(), BuildTeacherStores(stores)]

    # ------------------------------------------------------------------ steps
    def student_losses(
        self,
        batch: dict[str, Any],
        teachers: dict[str, TeacherTargets],
        gather: Gather,
        epoch: float = 0.0,
    ) -> Iterator[tuple[str, AdapterOutput, dict[str, dict[str, Tensor]]]]:
        """(role, output, {group: {term: value}}) for every student on this batch; `epoch` is
        the training progress (terms that warm up read it)."""
        labels = batch.get("labels")
        for role, student in self.students.items():
            loss = self.losses[role]
            out = student(batch["inputs"][role], layers=loss.student_layers())
            yield role, out, loss(out, teachers, labels, gather, epoch)

    def epoch_progress(self, batch_idx: int) -> float:
        """Training progress in epochs at this batch (1.5: halfway through the second), for
        terms that warm up; the epoch count alone when the epoch length is unknown."""
        if self._trainer is None:
            return 0.0
        batches = self.trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # inf for streamed data
            return float(self.current_epoch)
        return self.current_epoch + batch_idx / batches

    def _name(self, stage: str, role: str, term: str) -> str:
        return f"{stage}/{self.student_slots[role].metric_prefix}{term}"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.log_skipped(batch, "train")
        size = len(batch["ids"])
        teacher = self.teacher_targets(batch, "train") if size else {}
        total = None
        named: dict[str, Tensor] = {}
        if size:
            progress = self.epoch_progress(batch_idx)
            for role, _, terms in self.student_losses(batch, teacher, distributed_gather, progress):
                for term, value in self.losses[role].named(terms).items():
                    named[self._name("train", role, term)] = value
                role_total = self.losses[role].total(terms)
                total = role_total if total is None else total + role_total
        if total is None:  # every sample of the batch was skipped
            total = sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
        self.check_finite(total, named)
        if self.logging_step():
            self.log_dict({k: v.detach() for k, v in named.items()}, batch_size=max(size, 1))
            self.log("train/loss", total.detach(), prog_bar=True, batch_size=max(size, 1))
        return total

    def logging_step(self) -> bool:
        """Log training terms only on the steps the logger writes (trainer.log_every_n_steps):
        logging every step costs about 5% of a small student's step for values nobody sees."""
        if self._trainer is None:
            return True
        # the condition Lightning's logger connector writes on (step counted after this one)
        return (self.trainer.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0

    def check_finite(self, total: Tensor, named: dict[str, Tensor]) -> None:
        """Stop, or mark the step to be skipped, when the loss is NaN/Inf on any process."""
        bad = not bool(torch.isfinite(total))
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        self.skip_step = False
        if not bad:
            return
        culprits = (
            ", ".join(f"{k}={v.item():.4g}" for k, v in named.items() if not torch.isfinite(v))
            or f"total={total.item():.4g}"
        )
        where = f"epoch {self.current_epoch}, step {self.global_step}"
        if self.distill.nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at {where}: {culprits} (on this or another process). "
                "Set distill.nonfinite_loss=skip to skip such steps."
            )
        log.warning("skipping the optimizer step at %s: non-finite loss %s", where, culprits)
        self.skip_step = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.skip_step:  # drop every gradient: the optimizer leaves parameters without one alone
            optimizer.zero_grad(set_to_none=True)

    def log_skipped(self, batch: dict[str, Any], stage: str) -> None:
        if batch.get("skipped"):
            self.log(
                f"{stage}/skipped_samples",
                float(batch["skipped"]),
                reduce_fx="sum",
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=1,
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log_skipped(batch, "val")
        size = len(batch["ids"])
        if not size:
            return
        teacher = self.teacher_targets(batch, "val")
        labels = batch.get("labels")
        total = 0.0
        # validation follows the epoch just trained: a warmed-up term counts as at its end
        progress = float(self.current_epoch + 1)
        for role, out, terms in self.student_losses(batch, teacher, local_gather, progress):
            total = total + self.losses[role].total(terms)
            preds = class_scores(out, self.class_embeddings)
            if role in self.val_accuracy and preds is not None and labels is not None:
                self.val_accuracy[role].update(preds, labels)
                prefix = self.student_slots[role].metric_prefix
                self.log(
                    f"val/{prefix}accuracy",
                    self.val_accuracy[role],
                    prog_bar=not prefix,
                    batch_size=size,
                )
        self.log("val/loss", total, prog_bar=True, sync_dist=True, batch_size=size)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """timm's optimizer over the students and loss parameters (never the teachers), and the
        warmup schedule stepped every step (mmkd.optim)."""
        optimizer = make_optimizer(self, self.optim)
        scheduler = make_scheduler(
            optimizer, self.optim, int(self.trainer.estimated_stepping_batches)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
