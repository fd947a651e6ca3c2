"""Terms on the pooled embedding: regression, CLIP InfoNCE and relational KD (RKD)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Gather, LossTerm, TermContext, TermInputs, local_gather, register_term


def embed_loss(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Regression of the student embedding onto the teacher's: 1 - cosine, or mean squared error."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


def contrastive_loss(
    student: Tensor, teacher: Tensor, logit_scale: Tensor, gather: Gather = local_gather
) -> Tensor:
    """Symmetric InfoNCE over the pairs of a batch (CLIP). With `gather`, negatives come from
    every process: local rows against global columns, labels offset by this rank's position."""
    all_student, offset = gather(student)
    all_teacher, _ = gather(teacher)
    labels = torch.arange(student.shape[0], device=student.device) + offset
    s2t = logit_scale * student @ all_teacher.T
    t2s = logit_scale * teacher @ all_student.T
    return (F.cross_entropy(s2t, labels) + F.cross_entropy(t2s, labels)) / 2


def _normalised_distances(x: Tensor) -> Tensor:
    # cdist's default matrix-product path (used above 25 rows) leaves small non-zero values
    # on the diagonal, which `d > 0` would then count in the mean: compute it directly
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    positive = d[d > 0]
    return d / positive.mean() if positive.numel() else d


def _angles(x: Tensor) -> Tensor:
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # diff[i, j] = unit(x_j - x_i)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-D: Huber loss between mean-normalised pairwise distance matrices (Park et al. 2019)."""
    return F.smooth_l1_loss(_normalised_distances(student), _normalised_distances(teacher))


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-A: Huber loss between the cosines of the angles every triplet forms."""
    return F.smooth_l1_loss(_angles(student), _angles(teacher))


@dataclass
class EmbedCfg:
    """Regression of the student embedding onto the teacher's."""

    weight: float = 0.0
    kind: str = "cosine"  # cosine | mse


@register_term
class Embed(LossTerm):
    name = "embed"
    Config = EmbedCfg
    student_outputs = frozenset({"embedding"})
    teacher_space = True
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"kind": ("cosine", "mse")}

    def forward(self, inputs: TermInputs) -> Tensor:
        return embed_loss(inputs.mapped_embedding, inputs.teacher_embedding, self.cfg.kind)


@dataclass
class ContrastiveCfg:
    """CLIP InfoNCE between paired student and teacher embeddings."""

    weight: float = 0.0
    temperature: float = 0.07  # initial temperature (CLIP)
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # clamp of 1/temperature, as in CLIP
    global_negatives: bool = True  # gather embeddings across processes (with gradients)


@register_term
class Contrastive(LossTerm):
    name = "contrastive"
    Config = ContrastiveCfg
    student_outputs = frozenset({"embedding"})
    teacher_space = True
    positive = ("temperature", "max_logit_scale")

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        init = torch.tensor(1.0 / cfg.temperature).log()
        self.log_logit_scale = nn.Parameter(init, requires_grad=cfg.learn_temperature)

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, inputs: TermInputs) -> Tensor:
        gather = inputs.gather if self.cfg.global_negatives else local_gather
        return contrastive_loss(
            inputs.mapped_embedding, inputs.teacher_embedding, self.logit_scale, gather
        )


@dataclass
class RelationalCfg:
    """RKD: distances and angles between the samples of a batch (Park et al. 2019)."""

    weight: float = 0.0
    distance_weight: float = 1.0  # RKD-D inside the term (Park et al. use 25 and 50 overall)
    angle_weight: float = 2.0  # RKD-A


@register_term
class Relational(LossTerm):
    name = "relational"
    Config = RelationalCfg
    student_outputs = frozenset({"embedding"})
    non_negative = ("distance_weight", "angle_weight")

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = inputs.student_embedding, inputs.teacher_embedding
        cfg = self.cfg
        return cfg.distance_weight * rkd_distance(s, t) + cfg.angle_weight * rkd_angle(s, t)
