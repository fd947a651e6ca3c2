"""The LightningModule: frozen teacher(s), trainable student(s), weighted loss terms.

Teachers are deliberately *not* registered submodules: they never reach the optimizer,
DDP/FSDP wrapping or checkpoints, and `train()` cannot switch them out of eval mode. They still
follow the module across devices and dtypes (see `_apply`).

Each student has one `DistillLoss` per teacher (that teacher's terms, with their own learned
parts) and one for the label terms; metrics are named `train/[ROLE/][TEACHER/]TERM` (the
one-teacher shorthand and label terms carry no teacher name).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from mmkd.adapters import Adapter, AdapterOutput
from mmkd.adapters.base import class_scores
from mmkd.checkpoint import rng_state, set_rng_state
from mmkd.config.validate import loss_sections
from mmkd.errors import ConfigError, MMKDError
from mmkd.losses import DistillLoss, FeatureTarget, Gather, distributed_gather, local_gather
from mmkd.store import TeacherTargets
from mmkd.teacher_source import TeacherSource, make_teacher_source

log = logging.getLogger(__name__)


class NonFiniteLossError(MMKDError):
    """A loss term became NaN or Inf and distill.nonfinite_loss=stop."""


LABELS = "labels"  # the loss group of the terms that use no teacher (with several teachers)
SHORTHAND = "teacher"  # the name of the one teacher of `teacher=...`


def freeze_unused_head(student: Adapter, losses: list[DistillLoss], role: str) -> None:
    """Freeze the head parts no loss term trains (they would stay random, and DDP refuses
    parameters that receive no gradient)."""
    outputs = set().union(*(loss.student_outputs() for loss in losses))
    uses_logits = "logits" in outputs
    uses_embedding = "embedding" in outputs
    head = student.head
    if head.classifier is not None and not uses_logits:
        log.info("%s: no loss term uses class logits; its classifier is frozen", role)
        head.classifier.requires_grad_(False)
    if not uses_embedding and any(True for _ in head.proj.parameters()):
        log.info("%s: no loss term uses the embedding; its projection is frozen", role)
        head.proj.requires_grad_(False)


def check_same_views(teachers: dict[str, Adapter], students: dict[str, Adapter]) -> None:
    """A teacher whose training input is augmented sees view v of a sample; a student of the same
    modality must draw the same view (the same settings), or it learns the teacher's outputs on
    other inputs. Compared where both preprocessors say their settings (text views)."""
    for name, teacher in teachers.items():
        settings = teacher.make_preprocessor().augmentation()
        if not settings:
            continue
        teacher_key = "teacher" if name == SHORTHAND else f"teachers.{name}"
        for role, student in students.items():
            theirs = student.make_preprocessor().augmentation()
            if student.modality == teacher.modality and theirs is not None and theirs != settings:
                student_key = "student" if role == "student" else f"extra_students.{role}"
                raise ConfigError(
                    f"{student_key}: its training views ({theirs or 'none'}) differ from "
                    f"{teacher_key}'s ({settings}); give both the same augmentation settings "
                    "(e.g. the same text.augment), so the student reads the view the teacher saw"
                )


class DistillModule(pl.LightningModule):
    """Trains the student(s) against a frozen teacher (or labels) with the weighted `losses`.

    The teacher is kept outside the module's submodules: never in the optimizer, DDP or
    checkpoints, always in eval mode."""

    def __init__(
        self,
        cfg: DictConfig,
        teachers: dict[str, Adapter] | Adapter | None,
        students: dict[str, Adapter],
        class_names: list[str] | None = None,
        class_prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.students = nn.ModuleDict(students)
        if teachers is None or isinstance(teachers, Adapter):  # the one-teacher shorthand
            teachers = {SHORTHAND: teachers} if teachers is not None else {}
        # unregistered on purpose (module docstring)
        object.__setattr__(self, "teachers", dict(teachers))
        for teacher in self.teachers.values():
            teacher.requires_grad_(False).eval()
        check_same_views(self.teachers, students)
        self.losses = nn.ModuleDict(
            {role: self.build_losses(cfg, role, student) for role, student in students.items()}
        )
        for role, student in students.items():
            freeze_unused_head(student, list(self.losses[role].values()), role)
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
        self._pending_rng: dict[str, Any] | None = None  # RNG state from a resumed checkpoint
        self._compiled = False
        # where each teacher's outputs come from: a live forward pass or the teacher store,
        # with the features its terms read for every student
        self.teacher_sources: dict[str, TeacherSource] = {
            name: make_teacher_source(cfg, teacher, name, self.teacher_features(name))
            for name, teacher in self.teachers.items()
        }

    def build_losses(self, cfg: DictConfig, role: str, student: Adapter) -> nn.ModuleDict:
        """One DistillLoss per teacher (its terms) and one for the label terms."""
        student_key = "student" if role == "student" else f"extra_students.{role}"
        groups = {}
        for key, section, scope, name in loss_sections(cfg, SHORTHAND in self.teachers):
            group = name or LABELS
            teacher = self.teachers.get(name) if name else None
            loss = DistillLoss(
                section,
                student.embed_dim,
                teacher.embed_dim if teacher is not None else None,
                scope,
                student=student,
                teacher=teacher,
                key=key,
                student_key=student_key,
                teacher_key="teacher" if name == SHORTHAND else f"teachers.{name}",
            )
            if loss.terms:
                groups[group] = loss
        return nn.ModuleDict(groups)

    def teacher_features(self, name: str) -> tuple[FeatureTarget, ...]:
        """The layers of teacher `name` that its terms read, for every student."""
        wanted = [
            target
            for groups in self.losses.values()
            if name in groups
            for target in groups[name].teacher_features()
        ]
        return tuple(dict.fromkeys(wanted))

    @property
    def teacher(self) -> Adapter | None:
        """The teacher, when there is exactly one."""
        return next(iter(self.teachers.values())) if len(self.teachers) == 1 else None

    @property
    def teacher_source(self) -> TeacherSource | None:
        """The teacher source, when there is exactly one teacher."""
        sources = list(self.teacher_sources.values())
        return sources[0] if len(sources) == 1 else None

    def configure_model(self) -> None:
        """distill.compile_student: compile the students' forward in place (state-dict keys
        unchanged, so checkpoints and exports are the same with or without it)."""
        if self.cfg.distill.compile_student and not self._compiled:
            for student in self.students.values():
                student.compile()
            self._compiled = True

    # ------------------------------------------------------------------ teacher handling
    def teacher_used(self, name: str) -> bool:
        """Whether any loss term reads teacher `name`."""
        return any(name in groups and groups[name].uses_teacher for groups in self.losses.values())

    @property
    def uses_teacher(self) -> bool:
        return any(self.teacher_used(name) for name in self.teachers)

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
        for name, source in self.teacher_sources.items():
            if self.teacher_used(name):
                source.setup(self)

    # ------------------------------------------------------------------ steps
    def student_losses(
        self,
        batch: dict[str, Any],
        teachers: dict[str, TeacherTargets],
        gather: Gather,
        epoch: float = 0.0,
    ) -> Iterator[tuple[str, AdapterOutput, dict[str, Tensor]]]:
        """(role, output, {metric suffix: term}) for every student on this batch; `epoch` is
        the training progress (terms that warm up read it)."""
        labels = batch.get("labels")
        for role, student in self.students.items():
            groups = self.losses[role]
            layers = list(
                dict.fromkeys(n for loss in groups.values() for n in loss.student_layers())
            )
            out = student(batch["inputs"][role], layers=layers)
            terms: dict[str, Tensor] = {}
            for group, loss in groups.items():
                teacher = teachers.get(group)
                values = loss(
                    out.embedding,
                    out.logits,
                    teacher.embedding if teacher else None,
                    teacher.logits if teacher else None,
                    labels,
                    gather,
                    student_layers=out.layers,
                    teacher_features=teacher.features if teacher else None,
                    epoch=epoch,
                )
                for term, value in values.items():
                    terms[self._term_name(group, term)] = value
            yield role, out, terms

    def epoch_progress(self, batch_idx: int) -> float:
        """Training progress in epochs at this batch (1.5: halfway through the second), for
        terms that warm up; the epoch count alone when the epoch length is unknown."""
        if self._trainer is None:
            return 0.0
        batches = self.trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # inf for streamed data
            return float(self.current_epoch)
        return self.current_epoch + batch_idx / batches

    @staticmethod
    def _term_name(group: str, term: str) -> str:
        return term if group in (SHORTHAND, LABELS) else f"{group}/{term}"

    def role_total(self, role: str, terms: dict[str, Tensor]) -> Tensor:
        """The weighted sum of a student's terms (named as `student_losses` names them)."""
        total = 0.0
        for group, loss in self.losses[role].items():
            for term, weight in loss.weights.items():
                total = total + weight * terms[self._term_name(group, term)]
        return total  # type: ignore[return-value]

    @staticmethod
    def _name(stage: str, role: str, term: str) -> str:
        return f"{stage}/{term}" if role == "student" else f"{stage}/{role}/{term}"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.log_skipped(batch, "train")
        size = len(batch["ids"])
        teacher = self.teacher_targets(batch, "train") if size else {}
        total = None
        named: dict[str, Tensor] = {}
        if size:
            progress = self.epoch_progress(batch_idx)
            for role, _, terms in self.student_losses(batch, teacher, distributed_gather, progress):
                for term, value in terms.items():
                    named[self._name("train", role, term)] = value
                role_total = self.role_total(role, terms)
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
        if self.cfg.distill.nonfinite_loss == "stop":
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
            total = total + self.role_total(role, terms)
            preds = class_scores(out, self.class_embeddings)
            if role in self.val_accuracy and preds is not None and labels is not None:
                self.val_accuracy[role].update(preds, labels)
                name = "val/accuracy" if role == "student" else f"val/{role}/accuracy"
                self.log(name, self.val_accuracy[role], prog_bar=role == "student", batch_size=size)
        self.log("val/loss", total, prog_bar=True, sync_dist=True, batch_size=size)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmkd_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # restored just before the next training batch, after the data loader has drawn its
        # seeds: the resumed run then draws exactly what the interrupted one would have
        self._pending_rng = checkpoint.get("mmkd_rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.cfg.optim
        decay, no_decay = [], []
        for param in self.parameters():  # students and loss parameters; never the teacher
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if optim.name == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))
        else:
            optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * optim.warmup_fraction)
        if optim.scheduler == "cosine":
            scheduler = get_cosine_with_min_lr_schedule_with_warmup(
                optimizer, warmup, total, min_lr_rate=optim.min_lr_ratio
            )
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
