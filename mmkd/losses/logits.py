"""Terms on class logits: Hinton KD, logit MSE, decoupled KD (DKD) and cross-entropy with the
labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.errors import ConfigError

from .base import IGNORE_LABEL, LossTerm, TermContext, TermInputs, register_term, upcast


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of temperature-softened distributions, scaled by T² (Hinton 2015)."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


def _binary_log_probs(scaled: Tensor, target: Tensor) -> Tensor:
    """log [p(target), 1 - p(target)] of softmax(scaled), computed without subtraction."""
    mask = F.one_hot(target, scaled.shape[-1]).bool()
    total = torch.logsumexp(scaled, dim=-1)
    log_target = scaled.gather(1, target[:, None]).squeeze(1) - total
    log_rest = torch.logsumexp(scaled.masked_fill(mask, float("-inf")), dim=-1) - total
    return torch.stack([log_target, log_rest], dim=1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, each scaled by T².

    TCKD: KL between the binary (target, all other classes) distributions of teacher and
    student; NCKD: KL between their distributions over the non-target classes only."""
    t = temperature
    s, te = upcast(student_logits) / t, upcast(teacher_logits) / t
    tckd = F.kl_div(
        _binary_log_probs(s, target),
        _binary_log_probs(te, target),
        reduction="batchmean",
        log_target=True,
    )
    mask = F.one_hot(target, s.shape[-1]).bool()
    nckd = F.kl_div(
        F.log_softmax(s.masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0),
        F.log_softmax(te.masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0),
        reduction="batchmean",
        log_target=True,
    )
    return (alpha * tckd + beta * nckd) * t * t


def labelled(labels: Tensor) -> Tensor:
    """Which rows of a batch carry a label (the others are IGNORE_LABEL: unlabelled rows)."""
    return labels != IGNORE_LABEL


def check_classifiers(ctx: TermContext, name: str, teacher_too: bool) -> None:
    """Logit terms need a classifier on the student (and the teacher), with the same classes."""
    where = f"{ctx.key}.{name}"
    if ctx.student is not None and ctx.student.num_classes is None:
        raise ConfigError(
            f"{ctx.student_key}.head.classifier: {where} needs class logits from the student "
            f"(set it true, or {where}.weight=0)"
        )
    if not teacher_too or ctx.teacher is None:
        return
    if ctx.teacher.num_classes is None:
        raise ConfigError(
            f"{ctx.teacher_key}.head.classifier: {where} needs class logits from the teacher"
        )
    if ctx.student is not None and ctx.student.num_classes != ctx.teacher.num_classes:
        raise ConfigError(
            f"{ctx.student_key}.head.num_classes: {where} compares class distributions, but "
            f"the student has {ctx.student.num_classes} classes and {ctx.teacher_key} "
            f"{ctx.teacher.num_classes}"
        )


@dataclass
class KDCfg:
    """Hinton KD: KL divergence of temperature-softened class distributions."""

    weight: float = 0.0
    temperature: float = 4.0


@register_term
class KD(LossTerm):
    name = "kd"
    Config = KDCfg
    student_outputs = frozenset({"logits"})
    positive = ("temperature",)

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        check_classifiers(ctx, self.name, teacher_too=True)

    def forward(self, inputs: TermInputs) -> Tensor:
        return kd_loss(inputs.student_logits, inputs.teacher_logits, self.cfg.temperature)


@dataclass
class LogitMSECfg:
    """Mean squared error between raw student and teacher logits (Tang et al. 2019)."""

    weight: float = 0.0


@register_term
class LogitMSE(LossTerm):
    """Tang et al. 2019's distillation loss: MSE between the logits themselves, no softmax, so
    the teacher's confidence scale is matched too (they found it better than KL for the BiLSTM
    student). Averaged over classes and rows; the teacher's full logits are needed."""

    name = "logit_mse"
    Config = LogitMSECfg
    needs_full_logits = True
    student_outputs = frozenset({"logits"})

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        check_classifiers(ctx, self.name, teacher_too=True)

    def forward(self, inputs: TermInputs) -> Tensor:
        return F.mse_loss(upcast(inputs.student_logits), upcast(inputs.teacher_logits))


@dataclass
class DKDCfg:
    """Decoupled KD (Zhao et al. 2022): target-class and non-target-class parts of KD."""

    weight: float = 0.0
    alpha: float = 1.0  # weight of TCKD (target vs the rest)
    beta: float = 8.0  # weight of NCKD (among the non-target classes); the paper's CIFAR value
    temperature: float = 4.0
    # the term's weight ramps linearly from 0 over this many epochs (the paper: 20 of 240)
    warmup_epochs: float = 0.0


@register_term
class DKD(LossTerm):
    name = "dkd"
    Config = DKDCfg
    needs_labels = True  # splits on the true class
    needs_full_logits = True  # NCKD needs every non-target class of the teacher
    student_outputs = frozenset({"logits"})
    positive = ("temperature",)
    non_negative = ("alpha", "beta", "warmup_epochs")

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        check_classifiers(ctx, self.name, teacher_too=True)

    def forward(self, inputs: TermInputs) -> Tensor:
        if inputs.labels is None:
            raise ValueError(f"losses.{self.name} needs labels but the batch has none")
        cfg = self.cfg
        ramp = min(inputs.epoch / cfg.warmup_epochs, 1.0) if cfg.warmup_epochs else 1.0
        rows = labelled(inputs.labels)  # it splits on the true class: labelled rows only
        if not rows.any():
            return inputs.student_logits.sum() * 0.0
        return ramp * dkd_loss(
            inputs.student_logits[rows],
            inputs.teacher_logits[rows],
            inputs.labels[rows],
            cfg.alpha,
            cfg.beta,
            cfg.temperature,
        )


@dataclass
class CECfg:
    """Cross-entropy with the labels (needs data.train_labels=true)."""

    weight: float = 0.0
    label_smoothing: float = 0.0


@register_term
class CE(LossTerm):
    name = "ce"
    Config = CECfg
    uses_teacher = False
    needs_labels = True
    student_outputs = frozenset({"logits"})
    non_negative = ("label_smoothing",)

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        check_classifiers(ctx, self.name, teacher_too=False)

    def forward(self, inputs: TermInputs) -> Tensor:
        """The mean over the labelled rows (rows labelled IGNORE_LABEL, a transfer set mixed
        into the data, are skipped; 0 when the batch has none)."""
        if inputs.labels is None:
            raise ValueError("losses.ce needs labels but the batch has none")
        if not labelled(inputs.labels).any():
            return inputs.student_logits.sum() * 0.0
        return F.cross_entropy(
            inputs.student_logits,
            inputs.labels,
            label_smoothing=self.cfg.label_smoothing,
            ignore_index=IGNORE_LABEL,
        )
