"""The AV-digits benchmark's report: labels come from what ran, and "better than" targets are met
only beyond the noise (formatting and verdicts only; the 15-minute benchmark is not run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from av_digits import (
    better_than,
    standard_error_of_difference,
    timed_epochs_label,
    write_report,
)


def test_timing_label_names_the_epochs_that_ran():
    assert timed_epochs_label(2) == "epoch 2 of 2"
    assert timed_epochs_label(4) == "median of epochs 2-4"
    with pytest.raises(ValueError):
        timed_epochs_label(1)


def test_combined_standard_error():
    # variances 1 and 4 over 2 and 4 seeds: sqrt(1/2 + 4/4)
    se = standard_error_of_difference([1.0, 2.414213562373095], [0.0, 2.0, 4.0, 2.0])
    assert se == pytest.approx((1 / 2 + (8 / 3) / 4) ** 0.5)
    assert standard_error_of_difference([1.0], [0.0, 1.0]) is None


@pytest.mark.parametrize(
    ("a", "b", "verdict"),
    [
        ([0.90, 0.91, 0.92], [0.80, 0.81, 0.82], "yes"),  # +0.10, s.e. 0.008
        ([0.9862, 0.9858, 0.9866], [0.9828, 0.9804, 0.9852], "yes"),  # +0.0034, s.e. 0.0014
        ([0.90, 0.95, 0.85], [0.89, 0.94, 0.86], "within noise"),  # +0.0033, s.e. 0.057
        ([0.80, 0.81, 0.82], [0.90, 0.91, 0.92], "**no**"),
        ([0.91], [0.80], "unknown: one seed cannot estimate the noise"),
    ],
)
def test_better_than_is_met_only_beyond_the_noise(a, b, verdict):
    value, got = better_than(a, b)
    assert got == verdict
    assert value.startswith(f"{sum(a) / len(a) - sum(b) / len(b):+.4f}")


def fake_results(kd: list[float], scratch: list[float]) -> dict[str, dict[str, float]]:
    """Every metric the report reads, for len(kd) seeds."""
    runs: dict[str, dict[str, float]] = {"mnist_teacher": {"student/accuracy": 0.99}}
    retrieval = {
        f"retrieval/{d}/{m}": 0.9
        for d in ("audio_to_image", "image_to_audio")
        for m in ("R@1", "R@5", "mAP")
    }
    for seed, (k, s) in enumerate(zip(kd, scratch, strict=True)):
        runs[f"mnist_compress/seed{seed}"] = {
            "student/accuracy": k,
            "teacher/accuracy": 0.99,
            "teacher/params": 11e6,
            "student/params": 84e3,
            "teacher/latency_ms": 8.0,
            "student/latency_ms": 1.0,
        }
        runs[f"mnist_scratch/seed{seed}"] = {"student/accuracy": s}
        runs[f"av_digits_xmodal/seed{seed}"] = {"student/accuracy": 0.99}
        runs[f"fsdd_supervised/seed{seed}"] = {"student/accuracy": 0.99}
        runs[f"av_digits_bind_text/seed{seed}"] = {
            "student/accuracy": 0.99,
            "image/accuracy": 0.95,
            **retrieval,
        }
    return runs


def test_report_labels_come_from_the_runs(tmp_path):
    overhead = {"ratio": 1.02, "batch_size": 64, "steps": 30, "rounds": 3}
    overhead |= {"mmkd_ms": 10.2, "plain_ms": 10.0}
    epochs = {"student_only": [3.5, 2.0, 2.2, 2.1], "cached": [5, 2.2, 2.4, 2.3]}
    epochs["uncached"] = [9.0, 6.0, 6.2, 6.1]
    write_report(
        tmp_path,
        argparse.Namespace(seeds=[0, 1, 2]),
        fake_results([0.90, 0.95, 0.85], [0.89, 0.94, 0.86]),
        epochs,
        12345,
        overhead,
        60.0,
    )
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Epoch seconds (median of epochs 2-4," in text
    assert "12,345 training images" in text and "20k" not in text
    assert "student-only 2.10, cached 2.30, uncached 6.10" in text  # medians of epochs 2-4
    assert "| cache: epoch time cached / student-only | 1.095 | ≤ 1.15 | yes |" in text
    row = next(line for line in text.splitlines() if "KD student − labels-only" in line)
    assert row.endswith("| within noise |")
    assert "median of 30 steps x 3 interleaved rounds" in text


def test_text_manifests_are_rewritten_only_when_their_rows_change(tmp_path):
    """An unchanged manifest keeps its mtime (its rows are its store key, tests/test_store.py)."""
    from text import write_csv

    path = write_csv(tmp_path / "train.csv", [("a good film", "positive")])
    stamp = path.stat().st_mtime_ns
    write_csv(path, [("a good film", "positive")])
    assert path.stat().st_mtime_ns == stamp
    write_csv(path, [("a bad film", "negative")])
    assert path.read_text().splitlines()[1] == "a bad film,negative"


def test_text_workers_take_runs_seed_by_seed_slowest_first():
    from text import worker_order

    tasks = [(s, r) for s in (2, 0) for r in ("bilstm_labels_only", "bilstm_kd_aug", "bilstm_kd")]
    assert worker_order(tasks, [2, 0]) == [
        (2, "bilstm_kd_aug"),
        (2, "bilstm_kd"),
        (2, "bilstm_labels_only"),
        (0, "bilstm_kd_aug"),
        (0, "bilstm_kd"),
        (0, "bilstm_labels_only"),
    ]


@pytest.mark.parametrize(
    ("reused", "after_teacher_s", "verdict"),
    [
        (
            0,
            80 * 60,
            "the benchmark after the teacher ≤ 90 min (2 run(s) at a time, the "
            "measurements and this report included), teacher ≤ 60 min | 80.0 min, 10.0 min | yes",
        ),
        (0, 95 * 60, "| 95.0 min, 10.0 min | no"),
        # runs reused: the invocation's own time says nothing, the runs' own times add up
        (
            3,
            5 * 60,
            "student runs ≤ 90 min of wall time (sum; runs of earlier invocations "
            "reused), teacher ≤ 60 min | 100.0 min, 10.0 min | no",
        ),
    ],
)
def test_text_time_target_uses_the_benchmark_wall_time_only_when_it_trained_every_run(
    tmp_path, reused, after_teacher_s, verdict
):
    from text import PROTOCOLS, write_report

    results = {
        "teacher/seed0": {"student/accuracy": 0.88, "wall_s": 600.0},
        "bilstm_labels_only/seed0": {"student/accuracy": 0.85, "wall_s": 3000.0},
        "bilstm_kd/seed0": {"student/accuracy": 0.86, "wall_s": 3000.0},
    }
    report = {
        "accuracy": {
            "teacher": [0.88],
            "bilstm_labels_only": [0.85],
            "bilstm_kd": [0.86],
            "bilstm_kd_aug": [],
            "small_transformer_kd": [],
            "small_transformer_kd_logits": [],
        },
        "costs": {},
        "protocol": PROTOCOLS["cpu"],
        "data_share": {"share": 0.01, "loader_s": 0.1, "model_s": 9.9},
        "epoch_s": {},
        "failed": {},
        "wall_s": after_teacher_s + 600.0,
        "after_teacher_wall_s": after_teacher_s,
        "jobs": 2,
        "student_threads": 1,
        "runs_reused": reused,
    }
    args = argparse.Namespace(full=False, seeds=[0], accelerator="cpu")
    write_report(tmp_path, "agnews", args, report, results)
    text = (tmp_path / "RESULTS.md").read_text()
    assert verdict in text
    assert "the teacher's token embeddings trained" in text  # AG News's protocol
