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
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from mmkd.adapters import Adapter, AdapterOutput
from mmkd.errors import MMKDError
from mmkd.losses import DistillLoss

log = logging.getLogger(__name__)


class NonFiniteLossError(MMKDError):
    """A loss term became NaN or Inf and distill.nonfinite_loss=stop."""


def classification_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection({
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    })


class DistillModule(pl.LightningModule):
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
        self.losses = nn.ModuleDict({
            role: DistillLoss(cfg.losses, student.embed_dim, teacher_dim)
            for role, student in students.items()
        })
        self.class_names = list(class_names or [])
        self.class_prompts = list(class_prompts or [])
        # zero-shot classifier: the teacher's embeddings of the class prompts (text teachers)
        self.register_buffer("class_embeddings", None, persistent=False)
        num_classes = len(self.class_names)
        self.val_accuracy = nn.ModuleDict(
            {role: MulticlassAccuracy(num_classes, average="micro") for role in students}
            if num_classes else {}
        )
        test_roles = [*students, "teacher"] if teacher is not None else list(students)
        self.test_metrics = nn.ModuleDict(
            {role: classification_metrics(num_classes) for role in test_roles}
            if num_classes else {}
        )
        self.agreement = nn.ModuleDict({role: MeanMetric() for role in students})
        self.cosine = nn.ModuleDict({role: MeanMetric() for role in students})
        self.skip_step = False  # set when a non-finite loss is skipped (nonfinite_loss=skip)
        self.teacher_targets = None  # optional TeacherCache serving stored teacher outputs

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
    def teacher_forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """(embedding, logits) of the teacher for this batch, from the cache when one is set."""
        if self.teacher_targets is not None:
            return self.teacher_targets.lookup(batch["ids"], device=self.device)
        out = self.teacher(batch["inputs"]["teacher"])
        return out.embedding, out.logits

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

    def on_test_start(self) -> None:
        self.compute_class_embeddings()

    # ------------------------------------------------------------------ distributed helpers
    def gather(self, x: Tensor) -> tuple[Tensor, int]:
        """Rows of `x` from every process (with gradients) and the offset of this process's rows.
        Batches of different sizes (e.g. after skipped samples) are padded, then trimmed."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return x, 0
        sizes = self.all_gather(torch.tensor(x.shape[0], device=x.device)).tolist()
        padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
        gathered = self.all_gather(padded, sync_grads=True)  # (world, max, D)
        rows = torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
        return rows, sum(sizes[: dist.get_rank()])

    # ------------------------------------------------------------------ steps
    def predictions(self, out: AdapterOutput) -> Tensor | None:
        """Class scores: the classifier head, else zero-shot against the class prompts."""
        if out.logits is not None:
            return out.logits
        prompts = self.class_embeddings
        if prompts is not None and out.embedding.shape[-1] == prompts.shape[-1]:
            return out.embedding @ prompts.to(out.embedding.dtype).T
        return None

    def student_losses(self, batch: dict[str, Any], teacher: tuple[Tensor, Tensor | None] | None,
                       gather: Any = None) -> Iterator[tuple[str, AdapterOutput, dict[str, Tensor]]]:
        labels = batch.get("labels")
        t_emb, t_logits = teacher if teacher is not None else (None, None)
        for role, student in self.students.items():
            out = student(batch["inputs"][role])
            loss = self.losses[role]
            kwargs = {"gather": gather} if gather is not None else {}
            terms = loss(out.embedding, out.logits, t_emb, t_logits, labels, **kwargs)
            yield role, out, terms

    @staticmethod
    def _name(stage: str, role: str, term: str) -> str:
        return f"{stage}/{term}" if role == "student" else f"{stage}/{role}/{term}"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        self.log_skipped(batch, "train")
        size = len(batch["ids"])
        teacher = self.teacher_forward(batch) if self.uses_teacher and size else None
        total = None
        named: dict[str, Tensor] = {}
        if size:
            for role, _, terms in self.student_losses(batch, teacher, gather=self.gather):
                for term, value in terms.items():
                    named[self._name("train", role, term)] = value
                role_total = self.losses[role].total(terms)
                total = role_total if total is None else total + role_total
        if total is None:  # every sample of the batch was skipped
            total = sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
        self.check_finite(total, named)
        self.log_dict({k: v.detach() for k, v in named.items()}, batch_size=max(size, 1))
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=max(size, 1))
        return total

    def check_finite(self, total: Tensor, named: dict[str, Tensor]) -> None:
        """Stop, or mark the step to be skipped, when the loss is NaN/Inf on any process."""
        bad = not bool(torch.isfinite(total))
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        self.skip_step = False
        if not bad:
            return
        culprits = ", ".join(f"{k}={v.item():.4g}" for k, v in named.items()
                             if not torch.isfinite(v)) or f"total={total.item():.4g}"
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
            self.log(f"{stage}/skipped_samples", float(batch["skipped"]), reduce_fx="sum",
                     on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log_skipped(batch, "val")
        size = len(batch["ids"])
        if not size:
            return
        teacher = self.teacher_forward_eval(batch) if self.uses_teacher else None
        labels = batch.get("labels")
        total = 0.0
        for role, out, terms in self.student_losses(batch, teacher):
            total = total + self.losses[role].total(terms)
            preds = self.predictions(out)
            if role in self.val_accuracy and preds is not None and labels is not None:
                self.val_accuracy[role].update(preds, labels)
                name = "val/accuracy" if role == "student" else f"val/{role}/accuracy"
                self.log(name, self.val_accuracy[role], prog_bar=role == "student",
                         batch_size=size)
        self.log("val/loss", total, prog_bar=True, sync_dist=True, batch_size=size)

    def teacher_forward_eval(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Teacher outputs on evaluation batches: always a live forward (the cache is train-only)."""
        with torch.no_grad():
            out = self.teacher(batch["inputs"]["teacher"])
        return out.embedding, out.logits

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log_skipped(batch, "test")
        size = len(batch["ids"])
        if not size:
            return
        labels = batch.get("labels")
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(batch["inputs"]["teacher"])
            self.update_classification("teacher", teacher_out, labels, size)
        for role, student in self.students.items():
            out = student(batch["inputs"][role])
            self.update_classification(role, out, labels, size)
            if teacher_out is not None:
                self.update_agreement(role, out, teacher_out, size)

    def update_classification(self, role: str, out: AdapterOutput, labels: Tensor | None,
                              size: int) -> None:
        preds = self.predictions(out)
        if role not in self.test_metrics or preds is None or labels is None:
            return
        metrics = self.test_metrics[role]
        metrics.update(preds, labels)
        self.log_dict({f"{role}/{name}": metric for name, metric in metrics.items()},
                      batch_size=size)

    def update_agreement(self, role: str, out: AdapterOutput, teacher: AdapterOutput,
                         size: int) -> None:
        student_preds, teacher_preds = self.predictions(out), self.predictions(teacher)
        if student_preds is not None and teacher_preds is not None:
            same = (student_preds.argmax(-1) == teacher_preds.argmax(-1)).float()
            self.agreement[role].update(same)
            self.log(f"{role}/teacher_agreement", self.agreement[role], batch_size=size)
        if out.embedding.shape[-1] == teacher.embedding.shape[-1]:
            cos = F.cosine_similarity(out.embedding.float(), teacher.embedding.float(), dim=-1)
            self.cosine[role].update(cos)
            self.log(f"{role}/teacher_cosine", self.cosine[role], batch_size=size)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.cfg.optim
        decay, no_decay = [], []
        for param in self.parameters():  # students and loss parameters; never the teacher
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
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
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
