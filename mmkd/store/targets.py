"""What the loss terms get from a teacher for a batch, whether it ran live or was stored."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from mmkd.adapters import Adapter
from mmkd.losses import FeatureTarget


@dataclass
class TeacherTargets:
    """What the loss terms get from the teacher for a batch."""

    embedding: Tensor
    logits: Tensor | None
    features: dict[str, Tensor] = field(default_factory=dict)  # by FeatureTarget.name


def teacher_outputs(
    teacher: Adapter, inputs: dict[str, Tensor], features: tuple[FeatureTarget, ...] | list
) -> TeacherTargets:
    """The teacher's outputs on a batch of its input, with the features the terms read."""
    out = teacher(inputs, layers=list(dict.fromkeys(f.layer for f in features)))
    return TeacherTargets(
        out.embedding, out.logits, {f.name: f.apply(out.layers[f.layer]) for f in features}
    )
