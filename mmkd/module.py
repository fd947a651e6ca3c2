"""The LightningModule: frozen teacher, trainable student(s), weighted loss terms.

The teacher is deliberately *not* a registered submodule: it never reaches the optimizer,
DDP/FSDP wrapping or checkpoints, and `train()` cannot switch it out of eval mode. It still
follows the module across devices and dtypes (see `_apply`).
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
from mmkd.errors import MMKDError
from mmkd.losses import DistillLoss, Gather, distributed_gather, local_gather
from mmkd.store import TeacherTargets
from mmkd.teacher_source import make_teacher_source

log = logging.getLogger(__name__)


class NonFiniteLossError(MMKDError):
    """A loss term became NaN or Inf and distill.nonfinite_loss=stop."""


def freeze_unused_head(student: Adapter, loss: DistillLoss, role: str) -> None:
    """Freeze the head parts no loss term trains (they would stay random, and DDP refuses
    parameters that receive no gradient)."""
    uses_logits = "kd" in loss.weights or "ce" in loss.weights
    uses_embedding = bool({"embed", "contrastive", "relational"} & set(loss.weights))
    head = student.head
    if head.classifier is not None and not uses_logits:
        log.info("%s: no loss term uses class logits; its classifier is frozen", role)
        head.classifier.requires_grad_(False)
    if not uses_embedding and any(True for _ in head.proj.parameters()):
        log.info("%s: no loss term uses the embedding; its projection is frozen", role)
        head.proj.requires_grad_(False)


class DistillModule(pl.LightningModule):
    """Trains the student(s) against a frozen teacher (or labels) with the weighted `losses`.

    The teacher is kept outside the module's submodules: never in the optimizer, DDP or
    checkpoints, always in eval mode."""

    def __init__(
        self,
        cfg: DictConfig,
        teacher: Adapter | None,
        students: dict[str, Adapter],
        class_names: list[str] | None = None,
        class_prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.students = nn.ModuleDict(students)
        object.__setattr__(self, "teacher", teacher)  # unregistered on purpose (module docstring)
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        teacher_dim = teacher.embed_dim if teacher is not None else None
        self.losses = nn.ModuleDict(
            {
                role: DistillLoss(cfg.losses, student.embed_dim, teacher_dim)
                for role, student in students.items()
            }
        )
        for role, student in students.items():
            freeze_unused_head(student, self.losses[role], role)
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
        # where the teacher's outputs come from: a live forward pass or the teacher store
        self.teacher_source = make_teacher_source(cfg, teacher)

    def configure_model(self) -> None:
        """distill.compile_student: compile the students' forward in place (state-dict keys
        unchanged, so checkpoints and exports are the same with or without it)."""
        if self.cfg.distill.compile_student and not self._compiled:
            for student in self.students.values():
                student.compile()
            self._compiled = True

    # ------------------------------------------------------------------ teacher handling
    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and any(loss.uses_teacher for loss in self.losses.values())

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillModule:
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Any], split: str) -> TeacherTargets | None:
        """The teacher's outputs for this batch (None when no loss term uses the teacher)."""
        if not self.uses_teacher:
            return None
        return self.teacher_source.targets(batch, split)

    @torch.no_grad()
    def compute_class_embeddings(self) -> None:
        """Embed the class prompts with a text teacher, for zero-shot classification."""
        if self.teacher is None or self.teacher.modality != "text" or not self.class_prompts:
            return
        pre = self.teacher.make_preprocessor()
        batch = pre.collate([pre(p, train=False) for p in self.class_prompts])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.class_embeddings = self.teacher(batch).embedding.float()

    def on_fit_start(self) -> None:
        self.compute_class_embeddings()
        if self.uses_teacher:
            self.teacher_source.setup(self)

    # ------------------------------------------------------------------ steps
    def student_losses(
        self, batch: dict[str, Any], teacher: TeacherTargets | None, gather: Gather
    ) -> Iterator[tuple[str, AdapterOutput, dict[str, Tensor]]]:
        """(role, output, loss terms) for every student on this batch."""
        labels = batch.get("labels")
        t_emb, t_logits = (teacher.embedding, teacher.logits) if teacher else (None, None)
        for role, student in self.students.items():
            out = student(batch["inputs"][role])
            terms = self.losses[role](out.embedding, out.logits, t_emb, t_logits, labels, gather)
            yield role, out, terms

    @staticmethod
    def _name(stage: str, role: str, term: str) -> str:
        return f"{stage}/{term}" if role == "student" else f"{stage}/{role}/{term}"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.log_skipped(batch, "train")
        size = len(batch["ids"])
        teacher = self.teacher_targets(batch, "train") if size else None
        total = None
        named: dict[str, Tensor] = {}
        if size:
            for role, _, terms in self.student_losses(batch, teacher, distributed_gather):
                for term, value in terms.items():
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
        for role, out, terms in self.student_losses(batch, teacher, local_gather):
            total = total + self.losses[role].total(terms)
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
