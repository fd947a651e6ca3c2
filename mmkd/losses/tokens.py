"""Token-level terms for text transformers: hidden-state MSE (TinyBERT) and cosine (DistilBERT)
over the real tokens, and self-attention distribution transfer (MiniLM).

Pairs are `[student_layer, teacher_layer]` of the text adapter's token-level features:
`tokens.N` (B, L, H) and `attentions.N` (B, heads, L, L), zero past the mask and padded to
text.max_length (see adapters/text.py). Every term averages over the real tokens only, read from
the student's `attention_mask`: padded positions never change the loss. Comparing token by token
needs the same token positions on both sides, so the student and the teacher must tokenize
alike: the same tokenizer, max_length and text views (a keep_layers student of the teacher
does); anything else is a start-up error naming both models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.errors import ConfigError, SettingError

from .base import FeatureTarget, LayerPairTerm, TermContext, TermInputs, register_term
from .layers import Pairs

MASK = "attention_mask"  # the student feature that says which positions are real tokens


def masked_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of per-token `values` (B, T) over the positions where `mask` (B, T) is 1."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def token_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """TinyBERT's hidden-state loss, masked: the mean squared error over the hidden units of the
    real tokens. `student` (already projected to the teacher's width) and `teacher`: (B, T, H)."""
    per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    return masked_token_mean(per_token, mask)


def token_cosine(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """DistilBERT's cosine loss: the mean over real tokens of 1 - cos(student, teacher), the
    hidden states (B, T, H) compared token by token."""
    cosine = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    return masked_token_mean(1.0 - cosine, mask)


def attention_kl(student: Tensor, teacher: Tensor, mask: Tensor, heads: str = "equal") -> Tensor:
    """MiniLM's self-attention distribution transfer: KL(teacher || student) of each head's
    attention distribution of each real query over the real keys, averaged over heads and real
    queries. `student`, `teacher`: attention probabilities (B, heads, T, T). heads="mean"
    compares the head-averaged distributions (for different head counts)."""
    if heads == "mean":
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    real = mask > 0.5
    keys = real[:, None, None, :]
    teacher, student = teacher.float(), student.float()
    # clamped logs: a zero probability contributes 0 (teacher) or no gradient (student)
    log_ratio = teacher.clamp_min(1e-12).log() - student.clamp_min(1e-12).log()
    kl = torch.where(keys, teacher * log_ratio, torch.zeros_like(teacher)).sum(-1)  # (B, h, T)
    queries = real[:, None, :].expand_as(kl)
    return masked_token_mean(kl, queries)


def check_same_tokens(ctx: TermContext, key: str) -> None:
    """Token-level terms compare position by position: the student and teacher must tokenize
    alike (tokenizer, max_length, text views); a ConfigError names both models otherwise."""
    student = ctx.student.token_layout() if ctx.student is not None else None
    teacher = ctx.teacher.token_layout() if ctx.teacher is not None else None
    if student is None or teacher is None:
        side = ctx.student_key if student is None else ctx.teacher_key
        raise ConfigError(f"{key}: needs token positions, but {side} is not a text transformer")
    differ = [k for k in ("tokenizer", "max_length", "augment") if student[k] != teacher[k]]
    if differ:
        raise ConfigError(
            f"{key}: compares tokens position by position, so {ctx.student_key} "
            f"({student['source']}, max_length {student['max_length']}) and {ctx.teacher_key} "
            f"({teacher['source']}, max_length {teacher['max_length']}) must tokenize alike; "
            f"their {', '.join('text views' if d == 'augment' else d for d in differ)} differ"
        )


class TokenPairTerm(LayerPairTerm):
    """A term over pairs of token-level features, averaged over the real tokens."""

    prefix: ClassVar[str] = "tokens."  # the kind of feature both sides of a pair must be

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        key = f"{ctx.key}.{self.name}"
        check_same_tokens(ctx, key)
        for s, t in self.pairs:
            if not (s.startswith(self.prefix) and t.startswith(self.prefix)):
                raise SettingError(
                    "pairs",
                    f"[{s}, {t}]: {self.name} compares {self.prefix}N features "
                    "on both sides (`mmkd layers` lists them)",
                )
            if self.token_axes(self.student_shapes[s]) != self.token_axes(self.teacher_shapes[t]):
                raise SettingError(
                    "pairs",
                    f"[{s}, {t}] has shapes {self.student_shapes[s]} and "
                    f"{self.teacher_shapes[t]}: the token axes must match",
                )
        ctx.layer_shapes("student", [MASK], f"{key}.pairs")

    def token_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The token axes of a feature's per-sample shape: (L,) of (L, H)."""
        return shape[:-1]

    def student_layers(self) -> list[str]:
        return [*super().student_layers(), MASK]

    def token_pair_loss(self, index: int, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, inputs: TermInputs) -> Tensor:
        """The sum of `token_pair_loss` over the pairs."""
        mask = inputs.student_layers[MASK]
        total = 0.0
        for index, (s, t) in enumerate(self.pairs):
            teacher = inputs.teacher_features[FeatureTarget(t, self.reduce).name]
            total = total + self.token_pair_loss(index, inputs.student_layers[s], teacher, mask)
        return total  # type: ignore[return-value]


class ProjectedTokenTerm(TokenPairTerm):
    """Hidden states token by token, through a learned linear map of the student's width onto
    the teacher's where they differ (identity where they are equal)."""

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        self.projections = nn.ModuleList(
            nn.Identity()
            if self.student_shapes[s][-1] == self.teacher_shapes[t][-1]
            else nn.Linear(self.student_shapes[s][-1], self.teacher_shapes[t][-1])
            for s, t in self.pairs
        )

    @staticmethod
    def compare(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def token_pair_loss(self, index: int, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        return self.compare(self.projections[index](student), teacher, mask)


@dataclass
class TokenHintCfg:
    """TinyBERT's hidden-state MSE over the real tokens (learned projection if widths differ)."""

    weight: float = 0.0
    pairs: Pairs = field(default_factory=list)  # [[tokens.N, tokens.M], ...]


@register_term
class TokenHint(ProjectedTokenTerm):
    name = "token_hint"
    Config = TokenHintCfg
    compare = staticmethod(token_mse)


@dataclass
class TokenCosineCfg:
    """DistilBERT's cosine of hidden states over the real tokens (projection if widths differ)."""

    weight: float = 0.0  # DistilBERT: 1, beside 5 x KD (T = 2) and 2 x MLM
    pairs: Pairs = field(default_factory=list)  # [[tokens.N, tokens.M], ...]


@register_term
class TokenCosine(ProjectedTokenTerm):
    name = "token_cosine"
    Config = TokenCosineCfg
    compare = staticmethod(token_cosine)


@dataclass
class AttentionKLCfg:
    """MiniLM: KL of the teacher's and student's self-attention distributions of a layer."""

    weight: float = 0.0
    pairs: Pairs = field(default_factory=list)  # [[attentions.N, attentions.M], ...]
    heads: str = "equal"  # equal: head by head (MiniLM) | mean: head-averaged distributions


@register_term
class AttentionKL(TokenPairTerm):
    name = "attention_kl"
    Config = AttentionKLCfg
    prefix = "attentions."
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"heads": ("equal", "mean")}

    def __init__(self, cfg: Any, ctx: TermContext) -> None:
        super().__init__(cfg, ctx)
        for s, t in self.pairs:
            s_heads, t_heads = self.student_shapes[s][0], self.teacher_shapes[t][0]
            if cfg.heads == "equal" and s_heads != t_heads:
                raise SettingError(
                    "pairs",
                    f"[{s}, {t}] has {s_heads} student and {t_heads} teacher heads; heads=equal "
                    "compares head by head (set its heads=mean to compare head-averaged attention)",
                )

    def token_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[1:]  # (L, L) of (heads, L, L)

    def token_pair_loss(self, index: int, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        return attention_kl(student, teacher, mask, self.cfg.heads)


__all__ = ["attention_kl", "masked_token_mean", "token_cosine", "token_mse"]
