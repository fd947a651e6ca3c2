"""Issue 14, finding 30: with one seed the CIFAR benchmark printed "+1.86 points (combined
standard error 0.00) > standard error: yes". One seed cannot estimate the noise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cifar10


def fake_run(out: Path, variant: str, seed: int) -> None:
    logs = out / "runs" / variant / f"seed{seed}" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,time/train_epoch_s\n0,10\n1,9\n2,9\n")


def test_one_seed_verdict_says_the_noise_is_unknown(tmp_path):
    protocol = {**cifar10.PROTOCOLS["cpu"]}
    accuracy = {"labels_only": 0.80, "kd_store": 0.8186, "kd_live": 0.817}
    results = {f"{v}/seed0": {"student/accuracy": a} for v, a in accuracy.items()}
    results["labels_only/seed0"]["student/params"] = 78_000
    for variant in cifar10.VARIANTS:
        fake_run(tmp_path, variant, 0)
    teacher = {"student/accuracy": 0.9, "student/params": 270_000, "wall_s": 60.0}
    report = cifar10.summarise(tmp_path, [0], protocol, results, teacher)
    report.update(wall_s=100.0, after_teacher_wall_s=40.0)
    report["teacher"]["trained_in_this_run"] = False
    args = argparse.Namespace(full=False, accelerator="cpu")
    cifar10.write_report(tmp_path, args, protocol, results, report)
    (row,) = [
        line
        for line in (tmp_path / "RESULTS.md").read_text().splitlines()
        if line.startswith("| stored-view KD − labels-only accuracy")
    ]
    assert "+1.86 points" in row
    assert "one seed cannot estimate the noise" in row
    assert "| yes |" not in row and "standard error 0.00" not in row
