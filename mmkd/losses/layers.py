"""Terms inside the networks, on pairs of layers: FitNets hints, attention transfer (AT) and
similarity-preserving KD (SP). Pairs are `[student_layer, teacher_layer]`, named as the model's
library names them (see `Adapter.feature_names`); each pair's term is summed over the pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List  # noqa: UP035  (OmegaConf reads the annotation)

import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    LayerPairTerm,
    TermContext,
    attention_map,
    match_spatial,
    register_term,
    upcast,
)


def pointwise_regressor(in_channels: int, out_channels: int, spatial_axes: int) -> nn.Module:
    """FitNets' regressor: a learned 1x1 convolution (a linear map for pooled features)."""
    if spatial_axes == 0:
        return nn.Linear(in_channels, out_channels)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_axes]
    return conv(in_channels, out_channels, kernel_size=1)


def hint_loss(regressed_student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets (Romero et al. 2015): mean squared error between the regressed student feature
    and the teacher's, after the student's spatial size is matched to the teacher's."""
    return F.mse_loss(match_spatial(regressed_student, teacher.shape[2:]), teacher)


def attention_loss(student_features: Tensor, teacher_map: Tensor) -> Tensor:
    """AT (Zagoruyko & Komodakis 2017), as their code computes it: the mean over batch and
    positions of the squared difference of the L2-normalised attention maps (p=2). The
    student's energy map is resized to the teacher's map before it is normalised."""
    energy = upcast(student_features).pow(2).mean(dim=1, keepdim=True)
    energy = match_spatial(energy, teacher_map.shape[1:]).squeeze(1)
    student_map = F.normalize(energy.flatten(1), dim=1)
    return (student_map - teacher_map.flatten(1)).pow(2).mean()


def similarity_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """SP (Tung & Mori 2019): || G_s - G_t ||_F^2 / b^2, where G = row-normalised (F F^T) of the
    batch's flattened features. Needs no shape match: layers of different models or
    modalities compare."""
    b = student_features.shape[0]

    def gram(x: Tensor) -> Tensor:
        flat = upcast(x).reshape(b, -1)
        return F.normalize(flat @ flat.T, dim=1)

    return (gram(student_features) - gram(teacher_features)).pow(2).sum() / (b * b)


Pairs = List[Any]  # noqa: UP006  [[student_layer, teacher_layer], ...], checked by parse_pairs


@dataclass
class HintCfg:
    """FitNets hints: a learned 1x1 conv maps each student layer onto the teacher layer."""

    weight: float = 0.0
    pairs: Pairs = field(default_factory=list)  # [[student_layer, teacher_layer], ...]


@register_term
class Hint(LayerPairTerm):
    name = "hint"
    Config = HintCfg
    same_spatial_rank = True

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        self.regressors = nn.ModuleList(
            pointwise_regressor(
                self.student_shapes[s][0],
                self.teacher_shapes[t][0],
                len(self.teacher_shapes[t]) - 1,
            )
            for s, t in self.pairs
        )

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        # resizing first is cheaper and equal: the 1x1 map and the resize are both linear
        student = match_spatial(student, teacher.shape[2:]) if teacher.ndim > 2 else student
        return hint_loss(self.regressors[index](student), teacher)


@dataclass
class AttentionCfg:
    """Attention transfer: normalised spatial attention maps (p=2) of each pair of layers."""

    weight: float = 0.0  # Zagoruyko & Komodakis use 1000 with this per-position mean
    pairs: Pairs = field(default_factory=list)


@register_term
class Attention(LayerPairTerm):
    name = "attention"
    Config = AttentionCfg
    reduce = "attention"  # the teacher store keeps the (small) attention map, not the layer
    needs_spatial = True

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        return attention_loss(student, teacher)


@dataclass
class SimilarityCfg:
    """Similarity-preserving KD: batch similarity matrices of each pair of layers."""

    weight: float = 0.0  # Tung & Mori use 3000 on CIFAR-10
    pairs: Pairs = field(default_factory=list)


@register_term
class Similarity(LayerPairTerm):
    name = "similarity"
    Config = SimilarityCfg

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        return similarity_loss(student, teacher)


__all__ = ["attention_loss", "attention_map", "hint_loss", "similarity_loss"]
