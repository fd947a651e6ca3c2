"""Evaluation metrics: one pass over the data (`collect`), then numbers from it (`compute_metrics`,
`model_costs`): accuracy, macro precision / recall / F1, agreement with the teacher, cross-modal
retrieval R@K and mAP, parameters and CPU latency. No plotting and no command line here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from mmkd.adapters import Adapter
from mmkd.adapters.base import class_scores
from mmkd.latency import count_parameters, cpu_latency_ms
from mmkd.pitch import pitch_agreement

RETRIEVAL_KS = (1, 5, 10)


@dataclass
class Collected:
    """Everything the metrics and plots need from one pass over the evaluation data."""

    labels: Tensor | None
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)  # roles that can classify
    modalities: dict[str, str] = field(default_factory=dict)
    first_inputs: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # for timing
    skipped: int = 0
    multilabel: set[str] = field(default_factory=set)  # roles whose scores are sigmoid logits
    # roles whose scores decode to pitch: role -> (pitch Hz, periodicity, voicing threshold)
    pitch: dict[str, tuple[Tensor, Tensor, float]] = field(default_factory=dict)


@torch.no_grad()
def collect(
    models: Mapping[str, Adapter],
    loader: DataLoader,
    class_embeddings: Tensor | None,
    device: torch.device | str = "cpu",
) -> Collected:
    """Run every model over `loader` (eval mode) and keep embeddings, class scores and labels."""
    embeddings: dict[str, list[Tensor]] = {role: [] for role in models}
    scores: dict[str, list[Tensor]] = {role: [] for role in models}
    labels: list[Tensor] = []
    out = Collected(labels=None, modalities={r: m.modality for r, m in models.items()})
    prompts = class_embeddings.to(device) if class_embeddings is not None else None
    for model in models.values():
        model.eval()
    for batch in loader:
        out.skipped += batch["skipped"]
        if not batch["ids"]:
            continue
        for role, model in models.items():
            inputs = {k: v.to(device) for k, v in batch["inputs"][role].items()}
            out.first_inputs.setdefault(role, {k: v[:1].cpu() for k, v in inputs.items()})
            result = model(inputs)
            embeddings[role].append(result.embedding.float().cpu())
            role_scores = class_scores(result, prompts)
            if role_scores is not None:
                scores[role].append(role_scores.float().cpu())
        if "labels" in batch:
            labels.append(batch["labels"])
    out.embeddings = {r: torch.cat(v) for r, v in embeddings.items() if v}
    out.scores = {r: torch.cat(v) for r, v in scores.items() if v}
    out.labels = torch.cat(labels) if labels else None
    out.multilabel = {r for r, m in models.items() if getattr(m, "multilabel", False)}
    for role, model in models.items():
        if getattr(model, "pitch_output", False) and role in out.scores:
            pitch, periodicity = model.decode(out.scores[role])
            out.pitch[role] = (pitch, periodicity, float(model.spec.crepe.voicing_threshold))
    return out


def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy (micro) and macro precision, recall and F1 of class `scores`."""
    args = {"preds": scores, "target": labels, "num_classes": num_classes}
    return {
        "accuracy": float(multiclass_accuracy(**args, average="micro")),
        "precision": float(multiclass_precision(**args, average="macro")),
        "recall": float(multiclass_recall(**args, average="macro")),
        "f1": float(multiclass_f1_score(**args, average="macro")),
    }


def retrieval_metrics(
    queries: Tensor, gallery: Tensor, query_labels: Tensor, gallery_labels: Tensor
) -> dict[str, float]:
    """R@K (a same-class item among the top K) and mAP, ranking the gallery by cosine similarity."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    relevant = query_labels[:, None] == gallery_labels[None, :]
    indexes = torch.arange(len(queries))[:, None].expand_as(similarity)
    flat = (similarity.flatten(), relevant.flatten(), indexes.flatten())
    out = {f"R@{k}": float(RetrievalHitRate(top_k=k)(*flat)) for k in RETRIEVAL_KS}
    out["mAP"] = float(RetrievalMAP()(*flat))
    return out


def retrieval_pairs(
    collected: Collected, teacher_roles: Sequence[str] = ("teacher",)
) -> list[tuple[str, str]]:
    """(query, gallery) role pairs of different modalities that share an embedding space
    (students only: teachers are compared through their own metrics)."""
    roles = [r for r in collected.embeddings if r not in teacher_roles]
    pairs = []
    for query in roles:
        for gallery in roles:
            if (
                query != gallery
                and collected.modalities[query] != collected.modalities[gallery]
                and collected.embeddings[query].shape[1] == collected.embeddings[gallery].shape[1]
            ):
                pairs.append((query, gallery))
    return pairs


def teacher_metrics(collected: Collected, teacher_roles: Sequence[str]) -> dict[str, float]:
    """ROLE/T_agreement (same predicted class) and ROLE/T_cosine (embedding cosine) of every
    student ROLE against every teacher role T: "teacher" for the one-teacher shorthand (keys
    ROLE/teacher_agreement), "teacher_NAME" for teachers.NAME (ROLE/teacher_NAME_agreement)."""
    metrics: dict[str, float] = {}
    for teacher in teacher_roles:
        teacher_emb = collected.embeddings.get(teacher)
        if teacher_emb is None:
            continue
        for role, emb in collected.embeddings.items():
            if role in teacher_roles:
                continue
            multilabel = {role, teacher} & collected.multilabel
            if role in collected.scores and teacher in collected.scores and not multilabel:
                same = collected.scores[role].argmax(-1) == collected.scores[teacher].argmax(-1)
                metrics[f"{role}/{teacher}_agreement"] = float(same.float().mean())
            if role in collected.pitch and teacher in collected.pitch:
                pitch, periodicity, _ = collected.pitch[role]
                t_pitch, t_periodicity, threshold = collected.pitch[teacher]
                found = pitch_agreement(pitch, t_pitch, periodicity, t_periodicity, threshold)
                prefix = "" if teacher == "teacher" else f"{teacher}_"
                metrics.update({f"{role}/{prefix}{k}": v for k, v in found.items()})
            if emb.shape[1] == teacher_emb.shape[1]:
                cosine = F.cosine_similarity(emb, teacher_emb).mean()
                metrics[f"{role}/{teacher}_cosine"] = float(cosine)
    return metrics


def compute_metrics(
    collected: Collected,
    num_classes: int,
    teacher_roles: Sequence[str] | str | None = ("teacher",),
) -> dict[str, float]:
    """Flat metric keys: ROLE/accuracy|precision|recall|f1, ROLE/teacher_agreement,
    ROLE/teacher_cosine (ROLE/teacher_NAME_... for named teachers),
    retrieval/QUERY_to_GALLERY/R@K|mAP, data/skipped_samples, and for pitch models
    ROLE/raw_pitch_accuracy|raw_chroma_accuracy|voicing_agreement against the teacher
    (mmkd.pitch; the teacher's voicing threshold).

    teacher_agreement (same argmax class) is skipped for multi-label (sigmoid) outputs: the
    classes are independent yes/no decisions, so the argmax is not the model's prediction (for
    pitch, the pitch metrics measure agreement instead)."""
    if teacher_roles is None:
        teacher_roles = ()
    elif isinstance(teacher_roles, str):
        teacher_roles = (teacher_roles,)
    metrics: dict[str, float] = {"data/skipped_samples": float(collected.skipped)}
    labels = collected.labels
    if labels is not None and num_classes:
        for role, scores in collected.scores.items():
            for name, value in classification_metrics(scores, labels, num_classes).items():
                metrics[f"{role}/{name}"] = value
    metrics.update(teacher_metrics(collected, teacher_roles))
    if labels is not None:
        for query, gallery in retrieval_pairs(collected, teacher_roles):
            name = f"{collected.modalities[query]}_to_{collected.modalities[gallery]}"
            found = retrieval_metrics(
                collected.embeddings[query], collected.embeddings[gallery], labels, labels
            )
            metrics.update({f"retrieval/{name}/{k}": v for k, v in found.items()})
    return metrics


def model_costs(
    models: Mapping[str, Adapter], collected: Collected, seconds: float
) -> dict[str, float]:
    """Parameters and CPU latency per sample (batch 1, a real evaluation sample) of each model."""
    out: dict[str, float] = {}
    for role, model in models.items():
        out[f"{role}/params"] = float(count_parameters(model))
        if role in collected.first_inputs:
            out[f"{role}/latency_ms"] = cpu_latency_ms(model, collected.first_inputs[role], seconds)
    return out
