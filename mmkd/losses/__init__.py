"""Distillation loss terms, one registry (`TERMS`), the weighted set of one student against
one teacher (`DistillLoss`) and all the groups of one student (`StudentLoss`, assembled from
the config's losses sections by `build_student_loss`). Adding a term: one module that defines
and registers it (see `mmkd.losses.base.LossTerm`), imported below, plus its test."""

from .base import (
    IGNORE_LABEL,
    REDUCTIONS,
    TERMS,
    FeatureTarget,
    Gather,
    LossTerm,
    TermContext,
    TermInputs,
    attention_map,
    distributed_gather,
    local_gather,
    match_spatial,
    register_term,
    term_classes,
)
from .embedding import contrastive_loss, embed_loss, rkd_angle, rkd_distance
from .layers import attention_loss, hint_loss, similarity_loss
from .logits import dkd_loss, kd_loss
from .sigmoid import sigmoid_kd_loss
from .student_loss import LABELS, StudentLoss, build_student_loss, freeze_unused_head
from .term_set import DistillLoss, active_terms, typed_losses
from .tokens import attention_kl, token_cosine, token_mse

__all__ = [
    "IGNORE_LABEL",
    "LABELS",
    "REDUCTIONS",
    "TERMS",
    "DistillLoss",
    "FeatureTarget",
    "Gather",
    "LossTerm",
    "StudentLoss",
    "TermContext",
    "TermInputs",
    "active_terms",
    "attention_kl",
    "attention_loss",
    "attention_map",
    "build_student_loss",
    "contrastive_loss",
    "distributed_gather",
    "dkd_loss",
    "embed_loss",
    "freeze_unused_head",
    "hint_loss",
    "kd_loss",
    "local_gather",
    "match_spatial",
    "register_term",
    "rkd_angle",
    "rkd_distance",
    "sigmoid_kd_loss",
    "similarity_loss",
    "term_classes",
    "token_cosine",
    "token_mse",
    "typed_losses",
]
