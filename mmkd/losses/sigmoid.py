"""Multi-label soft targets: binary cross-entropy of sigmoid outputs to the teacher's.

For models whose classes are independent sigmoids (CREPE's 360 pitch bins, audio taggers such
as PANNs / AST, EfficientAT's stored AudioSet predictions), where softmax KD does not apply.
"""

# OmegaConf reads these annotations at run time: keep typing.List here.
# ruff: noqa: UP006, UP035

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from mmkd.errors import ConfigError, SettingError

from .base import LossTerm, TermContext, TermInputs, register_term
from .logits import check_classifiers


def sigmoid_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Mean over samples and classes of w_c * BCE(sigmoid(s / T), sigmoid(t / T)), times T²
    (the gradient scale of Hinton KD). Teacher logits of -inf (classes a top-k store left out)
    are probability 0."""
    t = temperature
    target = torch.sigmoid(teacher_logits.float() / t)
    loss = F.binary_cross_entropy_with_logits(student_logits.float() / t, target, reduction="none")
    if class_weights is not None:
        loss = loss * class_weights.to(loss)
    return loss.mean() * t * t


@dataclass
class SigmoidKDCfg:
    """BCE of the student's sigmoid outputs to the teacher's probabilities (multi-label KD)."""

    weight: float = 0.0
    temperature: float = 1.0  # both sides' logits divided by it; the loss scaled by T²
    # one weight per class (e.g. CREPE's 360 bins); empty: every class weighs 1
    class_weights: List[float] = field(default_factory=list)


@register_term
class SigmoidKD(LossTerm):
    name = "sigmoid_kd"
    Config = SigmoidKDCfg
    student_outputs = frozenset({"logits"})
    positive = ("temperature",)

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        check_classifiers(ctx, self.name, teacher_too=True)
        weights = list(cfg.class_weights or [])
        classes = ctx.student.num_classes if ctx.student is not None else None
        if weights and classes is not None and len(weights) != classes:
            raise SettingError("class_weights", f"{len(weights)} weights for {classes} classes")
        self.register_buffer(
            "class_weights",
            torch.tensor(weights, dtype=torch.float32) if weights else None,
            persistent=False,
        )

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        super().check(cfg, key)
        for index, value in enumerate(cfg.class_weights or []):
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{key}.class_weights[{index}]: must be a number >= 0")

    def forward(self, inputs: TermInputs) -> Tensor:
        return sigmoid_kd_loss(
            inputs.student_logits, inputs.teacher_logits, self.cfg.temperature, self.class_weights
        )
