"""`DistillLoss`: the weighted terms of one student against one teacher (or the labels).

It is given typed values: a losses section as its schema's dataclass (one field per term, each
an instance of the term's `Config`), and each term is built from its own instance."""

from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any

import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mmkd.errors import settings_at

from .base import (
    FeatureTarget,
    Gather,
    LossTerm,
    TermContext,
    TermInputs,
    distributed_gather,
    term_classes,
)


def active_terms(losses: Any, scope: str = "all") -> list[type[LossTerm]]:
    """The registered terms `losses` (a losses section: its dataclass, or a config node of
    it) switches on (weight > 0) in `scope`: "teacher" (the terms on a teacher), "labels"
    (those on the labels only) or "all"."""
    return [
        cls
        for cls in term_classes()
        if getattr(losses, cls.name, None) is not None
        and getattr(losses, cls.name).weight > 0
        and (scope == "all" or cls.uses_teacher == (scope == "teacher"))
    ]


def typed_losses(section: Any) -> Any:
    """A losses section as its schema's dataclass (interpolations resolved): a config node of
    the schema is converted, a dataclass instance returned as it is."""
    if isinstance(section, DictConfig):
        if not is_dataclass(OmegaConf.get_type(section)):
            raise TypeError(
                "DistillLoss needs a typed losses section (its schema's dataclass, or a node "
                "merged onto OmegaConf.structured(mmkd.config.schema.losses_schema())), "
                "not a plain mapping"
            )
        return OmegaConf.to_object(section)
    return section


class DistillLoss(nn.Module):
    """The weighted loss of one student against a teacher's outputs and the labels.

    Holds the terms' learnable parts (hint regressors, the contrastive temperature) and, when
    an embedding term compares in the teacher's space and the dimensions differ, a learned
    linear map of the student embedding into it (FitNets-style). The total is
    `sum(weight[name] * term)`."""

    def __init__(
        self,
        losses: Any,
        student_dim: int,
        teacher_dim: int | None,
        scope: str = "all",
        **context: Any,
    ) -> None:
        """`losses`: the losses section, typed (a config node of its schema is converted)."""
        super().__init__()
        losses = typed_losses(losses)
        ctx = TermContext(student_dim, teacher_dim, **context)
        classes = active_terms(losses, scope)
        settings = {cls.name: getattr(losses, cls.name) for cls in classes}
        self.weights = {name: float(section.weight) for name, section in settings.items()}
        terms = {}
        for cls in classes:  # a term reports a wrong setting by field; named here at its key
            with settings_at(f"{ctx.key}.{cls.name}"):
                terms[cls.name] = cls(settings[cls.name], ctx)
        self.terms = nn.ModuleDict(terms)
        needs_space = any(term.teacher_space for term in self.terms.values())
        self.to_teacher = (
            nn.Linear(student_dim, teacher_dim, bias=False)
            if needs_space and teacher_dim is not None and teacher_dim != student_dim
            else None
        )

    @property
    def uses_teacher(self) -> bool:
        return any(term.uses_teacher for term in self.terms.values())

    def student_outputs(self) -> set[str]:
        """Which student outputs the terms train: "logits", "embedding"."""
        return {out for term in self.terms.values() for out in term.student_outputs}

    def student_layers(self) -> list[str]:
        return list(dict.fromkeys(n for term in self.terms.values() for n in term.student_layers()))

    def teacher_features(self) -> list[FeatureTarget]:
        return list(
            dict.fromkeys(f for term in self.terms.values() for f in term.teacher_features())
        )

    def forward(
        self,
        student_embedding: Tensor,
        student_logits: Tensor | None,
        teacher_embedding: Tensor | None,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        gather: Gather = distributed_gather,
        student_layers: dict[str, Tensor] | None = None,
        teacher_features: dict[str, Tensor] | None = None,
        epoch: float = 0.0,
    ) -> dict[str, Tensor]:
        """Unweighted terms by name; only the terms with a positive weight are computed."""
        mapped = student_embedding
        if self.to_teacher is not None:
            mapped = F.normalize(self.to_teacher(student_embedding), dim=-1)
        inputs = TermInputs(
            student_embedding=student_embedding,
            student_logits=student_logits,
            teacher_embedding=teacher_embedding,
            teacher_logits=teacher_logits,
            labels=labels,
            gather=gather,
            student_layers=student_layers or {},
            teacher_features=teacher_features or {},
            mapped_embedding=mapped,
            epoch=epoch,
        )
        return {name: term(inputs) for name, term in self.terms.items()}

    def total(self, terms: dict[str, Tensor], start: Tensor | float = 0.0) -> Tensor:
        """`start + sum(weight[name] * term)`, added in the terms' order (a student's groups
        chain their totals through `start`, so its sum runs in one order)."""
        total = start
        for name, weight in self.weights.items():
            total = total + weight * terms[name]
        return total  # type: ignore[return-value]
