"""Distillation loss terms. Each is a plain function of tensors (tested against its formula);
`DistillLoss` holds the learnable parts (temperature, dimension projection) and returns the
terms by name. The total is `sum(weight[name] * term)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

# gather(x) -> (all rows of every process, offset of this process's rows); identity when alone
Gather = Callable[[Tensor], tuple[Tensor, int]]


def local_gather(x: Tensor) -> tuple[Tensor, int]:
    """The single-process `Gather`: this batch only, offset 0."""
    return x, 0


def distributed_gather(x: Tensor) -> tuple[Tensor, int]:
    """Rows of `x` from every process, differentiable (gradients flow back to their owners),
    and the offset of this process's rows. Batches of different sizes (e.g. after skipped
    samples) are padded for the collective, then trimmed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(n) for n in sizes]
    padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[0]))
    gathered = dist_nn.all_gather(padded)
    rows = torch.cat([part[:n] for part, n in zip(gathered, counts, strict=True)])
    return rows, sum(counts[: dist.get_rank()])


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


class DistillLoss(nn.Module):
    """The weighted loss of one student against the teacher's outputs and the labels."""

    def __init__(self, cfg: DictConfig, student_dim: int, teacher_dim: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.weights = {
            name: float(cfg[name].weight)
            for name in ("kd", "embed", "contrastive", "relational", "ce")
            if cfg[name].weight > 0
        }
        # a learned map into the teacher's space when the dimensions differ (FitNets-style)
        needs_space = "embed" in self.weights or "contrastive" in self.weights
        self.to_teacher = (
            nn.Linear(student_dim, teacher_dim, bias=False)
            if needs_space and teacher_dim is not None and teacher_dim != student_dim
            else None
        )
        contrast = cfg.contrastive
        init = torch.tensor(1.0 / contrast.temperature).log()
        self.log_logit_scale = nn.Parameter(init, requires_grad=contrast.learn_temperature)
        if "contrastive" not in self.weights:
            self.log_logit_scale.requires_grad_(False)

    @property
    def uses_teacher(self) -> bool:
        return any(name in self.weights for name in ("kd", "embed", "contrastive", "relational"))

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=self.cfg.contrastive.max_logit_scale)

    def forward(
        self,
        student_embedding: Tensor,
        student_logits: Tensor | None,
        teacher_embedding: Tensor | None,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        gather: Gather = distributed_gather,
    ) -> dict[str, Tensor]:
        """Unweighted terms by name; only the terms with a positive weight are computed."""
        terms: dict[str, Tensor] = {}
        cfg = self.cfg
        if "kd" in self.weights:
            terms["kd"] = kd_loss(student_logits, teacher_logits, cfg.kd.temperature)
        if "embed" in self.weights or "contrastive" in self.weights:
            mapped = student_embedding
            if self.to_teacher is not None:
                mapped = F.normalize(self.to_teacher(student_embedding), dim=-1)
            if "embed" in self.weights:
                terms["embed"] = embed_loss(mapped, teacher_embedding, cfg.embed.kind)
            if "contrastive" in self.weights:
                scale = self.logit_scale
                terms["contrastive"] = contrastive_loss(
                    mapped,
                    teacher_embedding,
                    scale,
                    gather if cfg.contrastive.global_negatives else local_gather,
                )
        if "relational" in self.weights:
            rel = cfg.relational
            terms["relational"] = rel.distance_weight * rkd_distance(
                student_embedding, teacher_embedding
            ) + rel.angle_weight * rkd_angle(student_embedding, teacher_embedding)
        if "ce" in self.weights:
            if labels is None:
                raise ValueError("losses.ce needs labels but the batch has none")
            terms["ce"] = F.cross_entropy(
                student_logits, labels, label_smoothing=cfg.ce.label_smoothing
            )
        return terms

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())  # type: ignore[return-value]
