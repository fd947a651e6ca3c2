"""The summary table a run prints at the end."""

from __future__ import annotations

from pathlib import Path


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def format_summary(metrics: dict[str, float], run_dir: Path) -> str:
    """Teacher and student(s): accuracy, parameters, CPU latency per sample, and their ratios."""
    roles = sorted(
        {k.split("/")[0] for k in metrics if k.endswith("/params")},
        key=lambda r: (r != "teacher", r != "student", r),
    )
    rows = [("model", "accuracy", "macro F1", "params", "CPU ms/sample")]
    for role in roles:
        acc = metrics.get(f"{role}/accuracy")
        f1 = metrics.get(f"{role}/f1")
        rows.append(
            (
                role,
                f"{acc:.4f}" if acc is not None else "-",
                f"{f1:.4f}" if f1 is not None else "-",
                _fmt_params(metrics[f"{role}/params"]),
                f"{metrics[f'{role}/latency_ms']:.3f}",
            )
        )
    if "teacher" in roles and "student" in roles:
        params = metrics["teacher/params"] / metrics["student/params"]
        latency = metrics["teacher/latency_ms"] / metrics["student/latency_ms"]
        rows.append(("teacher/student", "", "", f"{params:.1f}x", f"{latency:.1f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"\nOutputs in {run_dir}: config.yaml, metrics.json, student/, checkpoints/")
    return "\n".join(lines)
