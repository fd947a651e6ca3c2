"""The loss-term interface and its registry: the one place that knows the terms.

A term is one file: its settings dataclass (which becomes `losses.<name>` in the config schema),
what it needs (teacher, labels, logits, embedding, layer features), its start-up checks and its
formula. `DistillLoss` builds the terms a config switches on (weight > 0) for one student and
one teacher, and the schema, the validation and the module ask the registry, never a list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from mmkd.errors import ConfigError, SettingError
from mmkd.registry import Registry

# the label of an unlabelled row in a training batch that mixes labelled and unlabelled rows
# (a transfer set, see mmkd.data.datamodule): label terms skip it, KD terms use the row
IGNORE_LABEL = -100  # torch's cross-entropy default ignore_index

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


# --------------------------------------------------------------------------- teacher features


def upcast(x: Tensor) -> Tensor:
    """`x` in at least float32 for a loss computation: half precisions go up to float32,
    float64 stays float64 (never a cast down)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def attention_map(features: Tensor) -> Tensor:
    """Attention transfer's spatial map (Zagoruyko & Komodakis 2017, p=2): the mean over
    channels of the squared activations, L2-normalised over all positions; shape (B, *spatial)."""
    energy = upcast(features).pow(2).mean(dim=1)
    return F.normalize(energy.flatten(1), dim=1).view_as(energy)


# how a term wants a teacher layer reduced before it is used or stored (compact and exact)
REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda features: features,
    "attention": attention_map,
}


@dataclass(frozen=True)
class FeatureTarget:
    """A teacher layer as a term consumes it: the layer's output, reduced by `reduce`."""

    layer: str
    reduce: str = "none"

    @property
    def name(self) -> str:
        return self.layer if self.reduce == "none" else f"{self.layer}@{self.reduce}"

    def apply(self, features: Tensor) -> Tensor:
        return REDUCTIONS[self.reduce](features)


# --------------------------------------------------------------------------- terms


@dataclass
class TermContext:
    """What a term is built for: one student against one teacher (or the labels)."""

    student_dim: int
    teacher_dim: int | None
    student: Any = None  # the student Adapter (layer names and shapes, classifier)
    teacher: Any = None  # the teacher Adapter, None for label terms
    key: str = "losses"  # config path of the losses section, for error messages
    student_key: str = "student"
    teacher_key: str = "teacher"

    def layer_shapes(self, side: str, names: Sequence[str], key: str) -> dict[str, tuple[int, ...]]:
        """Check the layer names of the student or teacher model (ConfigError at `key`
        listing the valid ones) and return their per-sample shapes."""
        model = self.student if side == "student" else self.teacher
        if model is None:
            raise ConfigError(f"{key}: layer features need the {side} model")
        model_key = self.student_key if side == "student" else self.teacher_key
        model.check_features(names, f"{key}, {side} layer of {model_key}")
        return model.feature_shapes(names)


@dataclass
class TermInputs:
    """One batch, as every term sees it."""

    student_embedding: Tensor
    student_logits: Tensor | None
    teacher_embedding: Tensor | None = None
    teacher_logits: Tensor | None = None
    labels: Tensor | None = None
    gather: Gather = local_gather
    student_layers: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)  # by FeatureTarget.name
    mapped_embedding: Tensor | None = None  # the student embedding in the teacher's space
    epoch: float = 0.0  # training progress in epochs (fractional), for terms that warm up


class LossTerm(nn.Module):
    """One weighted loss term. Subclasses set the class attributes and `forward`."""

    name: ClassVar[str]
    Config: ClassVar[type]  # its settings dataclass: `weight` plus the term's own fields
    uses_teacher: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    student_outputs: ClassVar[frozenset[str]] = frozenset()  # of "logits", "embedding"
    teacher_space: ClassVar[bool] = False  # compares embeddings in the teacher's space
    needs_full_logits: ClassVar[bool] = False  # refuses teacher logits kept as top-k only
    # settings checked at start-up: > 0, >= 0, one of
    positive: ClassVar[tuple[str, ...]] = ()
    non_negative: ClassVar[tuple[str, ...]] = ()
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        """`cfg`: this term's settings, an instance of its `Config` (DistillLoss converts the
        config section; a DictConfig of that schema reads the same)."""
        super().__init__()
        self.cfg = cfg  # the models in `ctx` are only read here, never kept (no references)

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        """Start-up checks of this term's settings (`key` is its config path)."""
        for sub in cls.positive:
            if cfg[sub] is not None and not cfg[sub] > 0:
                raise ConfigError(f"{key}.{sub}: must be > 0, got {cfg[sub]}")
        for sub in cls.non_negative:
            if cfg[sub] is not None and not cfg[sub] >= 0:
                raise ConfigError(f"{key}.{sub}: must be >= 0, got {cfg[sub]}")
        for sub, allowed in cls.choices.items():
            if cfg[sub] not in allowed:
                raise ConfigError(f"{key}.{sub}: {cfg[sub]!r} is not one of {', '.join(allowed)}")

    def student_layers(self) -> list[str]:
        """Student layers this term reads."""
        return []

    def teacher_features(self) -> list[FeatureTarget]:
        """Teacher layers this term reads (computed live or kept in the teacher store)."""
        return []

    def forward(self, inputs: TermInputs) -> Tensor:
        raise NotImplementedError


TERMS: Registry[type[LossTerm]] = Registry("loss term")
TERM_ORDER: list[str] = []  # registration order: the order of `losses` in the schema


def register_term(cls: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: add a term to the registry under `cls.name`."""
    TERMS.register(cls.name)(cls)
    TERM_ORDER.append(cls.name)
    return cls


def term_classes() -> list[type[LossTerm]]:
    """Every registered term, in registration order."""
    return [TERMS.get(name) for name in TERM_ORDER]


# --------------------------------------------------------------------------- layer pairs


def parse_pairs(pairs: Any) -> list[tuple[str, str]]:
    """`pairs: [[student_layer, teacher_layer], ...]` as tuples; a SettingError of the term's
    `pairs` otherwise."""
    out = []
    for index, pair in enumerate(pairs or []):
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise SettingError(
                f"pairs[{index}]", f"{list(pair)!r} is not [student_layer, teacher_layer]"
            )
        out.append((str(pair[0]), str(pair[1])))
    if not out:
        raise SettingError(
            "pairs",
            "list at least one [student_layer, teacher_layer] pair "
            "(e.g. [[stages.2, stages.2]]); the valid names are in the error of a wrong one",
        )
    return out


def match_spatial(x: Tensor, size: Sequence[int]) -> Tensor:
    """Resize the spatial axes of (B, C, *spatial) to `size`: adaptive average pooling when
    no axis grows, else linear / bilinear / trilinear interpolation (align_corners=False)."""
    size = tuple(size)
    if tuple(x.shape[2:]) == size:
        return x
    if all(s >= t for s, t in zip(x.shape[2:], size, strict=True)):
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
        return pool[len(size)](x, size)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class LayerPairTerm(LossTerm):
    """A term over configured [student_layer, teacher_layer] pairs; names and shapes are
    checked when it is built (start-up), listing the valid names on a typo."""

    reduce: ClassVar[str] = "none"
    needs_spatial: ClassVar[bool] = False
    same_spatial_rank: ClassVar[bool] = False

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        key = f"{ctx.key}.{self.name}"
        self.pairs = parse_pairs(cfg.pairs)
        self.student_shapes = ctx.layer_shapes(
            "student", [s for s, _ in self.pairs], f"{key}.pairs"
        )
        self.teacher_shapes = ctx.layer_shapes(
            "teacher", [t for _, t in self.pairs], f"{key}.pairs"
        )
        for s, t in self.pairs:
            s_shape, t_shape = self.student_shapes[s], self.teacher_shapes[t]
            if self.needs_spatial and (len(s_shape) < 2 or len(t_shape) < 2):
                raise SettingError(
                    "pairs",
                    f"[{s}, {t}] has shapes {s_shape} and {t_shape}; "
                    f"{self.name} needs spatial features (C, *positions) on both sides",
                )
            if self.same_spatial_rank and len(s_shape) != len(t_shape):
                raise SettingError(
                    "pairs",
                    f"[{s}, {t}] has shapes {s_shape} and {t_shape}: "
                    f"{self.name} needs features with the same number of spatial axes",
                )

    def student_layers(self) -> list[str]:
        return [s for s, _ in self.pairs]

    def teacher_features(self) -> list[FeatureTarget]:
        return [FeatureTarget(t, self.reduce) for _, t in self.pairs]

    def pair_loss(self, index: int, student: Tensor, teacher: Tensor) -> Tensor:
        """The term on pair `index`: the student layer and the teacher feature it reads."""
        raise NotImplementedError

    def forward(self, inputs: TermInputs) -> Tensor:
        """The sum of `pair_loss` over the pairs."""
        total = 0.0
        for index, (s, t) in enumerate(self.pairs):
            teacher = upcast(inputs.teacher_features[FeatureTarget(t, self.reduce).name])
            total = total + self.pair_loss(index, inputs.student_layers[s], teacher)
        return total  # type: ignore[return-value]
