"""`StudentLoss`: every loss group of one student (one `DistillLoss` per teacher, one for the
label terms), and `build_student_loss`, which assembles it from the losses sections.

A group is named by its teacher (`LABELS` for the label terms of a several-teacher run); its
terms are reported as `TERM`, or `TEACHER/TERM` when the group has a metric prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from mmkd.roles import Slot

from .base import FeatureTarget, Gather
from .term_set import DistillLoss

log = logging.getLogger(__name__)

LABELS = "labels"  # the group of the terms that use no teacher (with several teachers)


class StudentLoss(nn.ModuleDict):
    """One student's `DistillLoss` groups by teacher name (state-dict keys `GROUP.terms...`,
    as before this class existed), with the metric prefix of each group's terms."""

    def __init__(self, groups: Mapping[str, DistillLoss], prefixes: Mapping[str, str]) -> None:
        super().__init__(dict(groups))
        self.prefixes = {name: prefixes.get(name, "") for name in groups}

    def student_outputs(self) -> set[str]:
        """Which student outputs the terms train: "logits", "embedding"."""
        return set().union(*(loss.student_outputs() for loss in self.values()))

    def student_layers(self) -> list[str]:
        """The student layers any term reads, in first-use order."""
        return list(dict.fromkeys(n for loss in self.values() for n in loss.student_layers()))

    def teacher_features(self, teacher: str) -> list[FeatureTarget]:
        """The layers of `teacher` that this student's terms read."""
        return self[teacher].teacher_features() if teacher in self else []

    def uses_teacher(self, teacher: str) -> bool:
        return teacher in self and self[teacher].uses_teacher

    def forward(  # type: ignore[override]
        self,
        student: Any,
        teachers: Mapping[str, Any],
        labels: Tensor | None,
        gather: Gather,
        epoch: float = 0.0,
    ) -> dict[str, dict[str, Tensor]]:
        """Unweighted terms by group: `student` is the student's output (embedding, logits,
        layers), `teachers` each teacher's targets (embedding, logits, features) by name."""
        terms = {}
        for group, loss in self.items():
            teacher = teachers.get(group)
            terms[group] = loss(
                student.embedding,
                student.logits,
                teacher.embedding if teacher else None,
                teacher.logits if teacher else None,
                labels,
                gather,
                student_layers=student.layers,
                teacher_features=teacher.features if teacher else None,
                epoch=epoch,
            )
        return terms

    def named(self, terms: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The terms by metric suffix (`TERM` or `TEACHER/TERM`)."""
        return {
            f"{self.prefixes[group]}{term}": value
            for group, values in terms.items()
            for term, value in values.items()
        }

    def total(self, terms: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """The weighted sum of every group's terms, summed in one running order."""
        total: Any = 0.0
        for group, loss in self.items():
            total = loss.total(terms[group], start=total)
        return total


def freeze_unused_head(student: nn.Module, loss: StudentLoss, role: str) -> None:
    """Freeze the head parts no loss term trains (they would stay random, and DDP refuses
    parameters that receive no gradient)."""
    outputs = loss.student_outputs()
    head = student.head
    if head.classifier is not None and "logits" not in outputs:
        log.info("%s: no loss term uses class logits; its classifier is frozen", role)
        head.classifier.requires_grad_(False)
    if "embedding" not in outputs and any(True for _ in head.proj.parameters()):
        log.info("%s: no loss term uses the embedding; its projection is frozen", role)
        head.proj.requires_grad_(False)


def build_student_loss(
    sections: Iterable[tuple[str, Any, str, str | None]],
    student: Any,
    teachers: Mapping[str, Any],
    slot: Slot,
    teacher_slots: Mapping[str, Slot],
) -> StudentLoss:
    """The loss groups of the student in `slot` from the (config key, losses section (its
    dataclass), scope, teacher name) `sections` (None: the label terms), freezing the head
    parts no term trains. The teachers' slots give their config keys (in errors) and metric
    prefixes."""
    groups = {}
    for key, section, scope, name in sections:
        teacher = teachers.get(name) if name else None
        loss = DistillLoss(
            section,
            student.embed_dim,
            teacher.embed_dim if teacher is not None else None,
            scope,
            student=student,
            teacher=teacher,
            key=key,
            student_key=slot.key,
            teacher_key=teacher_slots[name].key if name else "teacher",
        )
        if loss.terms:
            groups[name or LABELS] = loss
    prefixes = {name: teacher_slot.metric_prefix for name, teacher_slot in teacher_slots.items()}
    loss = StudentLoss(groups, prefixes)
    freeze_unused_head(student, loss, slot.name)
    return loss
