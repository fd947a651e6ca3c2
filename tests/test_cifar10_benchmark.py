"""benchmarks/cifar10.py end to end on a tiny protocol (--smoke): the run contract and the
results file the README quotes (needs the CIFAR-10 folders in ../shared/data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_data_root

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_protocol_writes_every_run_and_both_ratios(tmp_path):
    data = shared_data_root()
    if not (data / "cifar10" / "train").is_dir():
        pytest.skip(f"CIFAR-10 not found at {data}")
    command = [sys.executable, str(ROOT / "benchmarks" / "cifar10.py"), "--smoke"]
    command += ["--seeds", "0", "1", "--out", str(tmp_path), "--data-root", str(data)]
    subprocess.run(command, check=True, cwd=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    for variant in ("teacher/seed0", "labels_only/seed0", "kd_live/seed1", "kd_store/seed1"):
        assert (tmp_path / "runs" / variant / "metrics.json").is_file()
        assert 0 <= results["runs"][variant]["student/accuracy"] <= 1
    ratios = results["ratios"]
    assert set(ratios) == {"kd_store_over_labels_only", "kd_live_over_labels_only"}
    assert all(value > 0 for value in ratios.values())
    assert results["store_build_s"] > 0  # built by the first seed's run, reused by the second
    stores = list((tmp_path / "teacher_store").iterdir())
    assert len(stores) == 2  # train (K views) + val
    report = (tmp_path / "RESULTS.md").read_text()
    assert "stored-view KD epoch / labels-only epoch" in report
    # the methods rows reuse these runs (labels-only, stored KD) and add one per method
    methods = [sys.executable, str(ROOT / "benchmarks" / "cifar10.py"), "--smoke"]
    methods += ["--methods", "--timing", "--seeds", "0", "--out", str(tmp_path)]
    subprocess.run([*methods, "--data-root", str(data)], check=True, cwd=tmp_path)
    table = (tmp_path / "METHODS.md").read_text()
    for label in ("FitNets hint", "attention transfer", "similarity-preserving", "DKD"):
        assert label in table
    saved = json.loads((tmp_path / "methods.json").read_text())
    assert set(saved["timing_epoch_s"]) == {
        "labels_only",
        "kd_store",
        "hint",
        "attention",
        "similarity",
        "dkd",
    }
