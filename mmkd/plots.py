"""Pictures of a run: training curves, confusion matrices, and the shared embedding space."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from mmkd.loggers import read_csv_log
from mmkd.metrics import Collected

MARKERS = {"image": "o", "audio": "^", "text": "s"}


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_curves(run_dir: Path, out: Path) -> Path | None:
    """Every train/* and val/* series of the run's CSV log against the step, one panel each."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in read_csv_log(run_dir):
        for key, value in row.items():
            if key.startswith(("train/", "val/")):
                series[key].append((row.get("step", 0.0), value))
    if not series:
        return None
    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps, values = zip(*series[name], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out)


def plot_confusion(
    scores: torch.Tensor, labels: torch.Tensor, class_names: list[str], title: str, out: Path
) -> Path:
    """The confusion matrix of `scores` against `labels`, counts written in the cells."""
    matrix = multiclass_confusion_matrix(scores, labels, num_classes=len(class_names))
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in zip(
        torch.cartesian_prod(
            torch.arange(len(class_names)), torch.arange(len(class_names))
        ).tolist(),
        matrix.flatten().tolist(),
        strict=True,
    ):
        if count:
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > matrix.max() / 2 else "black",
            )
    ax.set_title(title)
    return _save(fig, out)


def plot_embedding_space(
    collected: Collected, class_names: list[str], out: Path, max_points: int = 600
) -> Path | None:
    """PCA of every model's embeddings that share the largest common space: colour = class,
    marker = modality."""
    if collected.labels is None or not collected.embeddings:
        return None
    by_dim: dict[int, list[str]] = defaultdict(list)
    for role, emb in collected.embeddings.items():
        by_dim[emb.shape[1]].append(role)
    roles = max(by_dim.values(), key=len)
    stacked = torch.cat([collected.embeddings[r][:max_points] for r in roles])
    if min(stacked.shape) < 2:  # a 2-D projection needs 2 points and 2 dimensions
        return None
    centred = stacked - stacked.mean(0)
    _, _, v = torch.pca_lowrank(centred, q=2, center=False)
    points = (centred @ v[:, :2]).split(
        [min(len(collected.embeddings[r]), max_points) for r in roles]
    )
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for role, xy in zip(roles, points, strict=True):
        labels = collected.labels[: len(xy)]
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            c=[cmap(int(c) % cmap.N) for c in labels],
            s=14,
            alpha=0.7,
            marker=MARKERS.get(collected.modalities[role], "x"),
            label=f"{role} ({collected.modalities[role]})",
            edgecolors="none",
        )
    handles = [
        plt.Line2D([], [], linestyle="", marker="o", color=cmap(i % cmap.N), label=name)
        for i, name in enumerate(class_names)
    ]
    legend = ax.legend(loc="upper right", fontsize=7, title="model")
    ax.add_artist(legend)
    ax.legend(handles=handles, loc="lower left", fontsize=7, title="class", ncol=2)
    ax.set_title("shared embedding space (PCA)")
    return _save(fig, out)


def plot_evaluation(collected: Collected, class_names: list[str], out_dir: Path) -> list[Path]:
    """Confusion matrix per classifying model and the embedding-space picture."""
    written = []
    if collected.labels is not None and class_names:
        for role, scores in collected.scores.items():
            written.append(
                plot_confusion(
                    scores,
                    collected.labels,
                    class_names,
                    f"{role} ({collected.modalities[role]})",
                    out_dir / f"confusion_{role}.png",
                )
            )
    space = plot_embedding_space(collected, class_names, out_dir / "embedding_space.png")
    return [*written, space] if space else written
