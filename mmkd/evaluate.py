"""Evaluate trained models: classification, agreement with the teacher, cross-modal retrieval.

    python -m mmkd.evaluate RUN_DIR [key=value ...]      (also: mmkd-evaluate)

loads the exported student(s) of RUN_DIR, and its teacher when it can be built, evaluates them
on the test split of the data the run's config names — overrides such as
`data.fsdd.root=/some/folder data.fsdd.split=all` point it elsewhere — and writes
RUN_DIR/eval/<name>/metrics.json (same keys as the run's metrics.json) with plots beside it. The
last line of standard output is the metrics as one JSON object.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from mmkd.adapters import Adapter, build_adapter
from mmkd.adapters.base import class_scores
from mmkd.config.compose import describe_config_error, register_resolvers
from mmkd.config.schema import Config
from mmkd.data import build_splits
from mmkd.data.base import limit
from mmkd.data.module import RoleCollate
from mmkd.errors import CheckpointError, ConfigError, MMKDError
from mmkd.export import load_exported
from mmkd.io import write_json
from mmkd.latency import count_parameters, cpu_latency_ms

log = logging.getLogger(__name__)
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
    return out


def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
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


def retrieval_pairs(collected: Collected, teacher_role: str | None) -> list[tuple[str, str]]:
    """(query, gallery) role pairs of different modalities that share an embedding space."""
    roles = [r for r in collected.embeddings if r != teacher_role]
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


def compute_metrics(
    collected: Collected, num_classes: int, teacher_role: str | None = "teacher"
) -> dict[str, float]:
    """Flat metric keys: ROLE/accuracy|precision|recall|f1, ROLE/teacher_agreement,
    ROLE/teacher_cosine, retrieval/QUERY_to_GALLERY/R@K|mAP, data/skipped_samples."""
    metrics: dict[str, float] = {"data/skipped_samples": float(collected.skipped)}
    labels = collected.labels
    if labels is not None and num_classes:
        for role, scores in collected.scores.items():
            for name, value in classification_metrics(scores, labels, num_classes).items():
                metrics[f"{role}/{name}"] = value
    teacher_emb = collected.embeddings.get(teacher_role) if teacher_role else None
    for role, emb in collected.embeddings.items():
        if role == teacher_role or teacher_emb is None:
            continue
        if role in collected.scores and teacher_role in collected.scores:
            same = collected.scores[role].argmax(-1) == collected.scores[teacher_role].argmax(-1)
            metrics[f"{role}/teacher_agreement"] = float(same.float().mean())
        if emb.shape[1] == teacher_emb.shape[1]:
            metrics[f"{role}/teacher_cosine"] = float(F.cosine_similarity(emb, teacher_emb).mean())
    if labels is not None:
        for query, gallery in retrieval_pairs(collected, teacher_role):
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


def evaluate_models(
    models: Mapping[str, Adapter],
    loader: DataLoader,
    *,
    class_names: list[str],
    class_embeddings: Tensor | None,
    out_dir: Path | None,
    latency_seconds: float,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Metrics (and, with `out_dir`, plots) of `models` on `loader`. Used after training and by
    the command line, so a run's metrics.json and a later evaluation share their keys."""
    collected = collect(models, loader, class_embeddings, device)
    teacher_role = "teacher" if "teacher" in models else None
    metrics = compute_metrics(collected, len(class_names), teacher_role)
    if out_dir is not None:
        from mmkd.plots import plot_evaluation  # matplotlib only when plotting

        plot_evaluation(collected, class_names, out_dir)
    metrics.update(model_costs(models, collected, latency_seconds))
    return metrics


# --------------------------------------------------------------------------- command line


def load_run_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    register_resolvers()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; is this a run folder?")
    try:
        return OmegaConf.merge(
            OmegaConf.structured(Config),
            OmegaConf.load(config_file),
            OmegaConf.from_dotlist(list(overrides)),
        )
    except Exception as err:  # omegaconf errors name the key
        raise ConfigError(f"{run_dir}: {describe_config_error(err)}") from None


def load_run_models(run_dir: Path, cfg: DictConfig) -> tuple[dict[str, Adapter], Tensor | None]:
    """The exported students of a run, plus its teacher when that can still be built."""
    students = {"student": load_exported(run_dir / "student")}
    for folder in sorted(run_dir.glob("student_*")):
        students[folder.name.removeprefix("student_")] = load_exported(folder)
    models: dict[str, Adapter] = {role: e.model for role, e in students.items()}
    if cfg.teacher is not None:
        try:
            models["teacher"] = build_adapter(cfg.teacher, key="teacher").eval()
        except (MMKDError, OSError) as err:
            log.warning("teacher not evaluated (%s)", err)
    return models, students["student"].class_embeddings


def slug(overrides: Sequence[str]) -> str:
    text = "_".join(overrides) or "test"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", text)[:120]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    run_dir, overrides = Path(args[0]), args[1:]
    try:
        cfg = load_run_config(run_dir, overrides)
        if not (run_dir / "student").is_dir():
            raise CheckpointError(f"{run_dir}: no exported student (student/); did the run finish?")
        splits = build_splits(cfg.data, cfg.run.seed)
        models, class_embeddings = load_run_models(run_dir, cfg)
        collate = RoleCollate(
            {role: m.make_preprocessor() for role, m in models.items()},
            train=False,
            keep_labels=True,
            num_classes=splits.num_classes,
            on_error=cfg.data.on_error,
        )
        test_set = limit(splits.test, cfg.data.max_eval_samples, cfg.run.seed)
        loader = DataLoader(
            test_set,
            batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
        )
        out_dir = run_dir / "eval" / slug(overrides)
        metrics = evaluate_models(
            models,
            loader,
            class_names=splits.class_names,
            class_embeddings=class_embeddings,
            out_dir=out_dir,
            latency_seconds=cfg.run.latency_seconds,
        )
    except MMKDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(out_dir / "metrics.json", metrics)
    print(f"wrote {out_dir / 'metrics.json'}")
    print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
