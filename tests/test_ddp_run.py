"""`train.py` with 2 processes (CPU / gloo DDP) writes what a 1-process run writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny import assert_runs_match, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    *tiny_overrides("teacher", "image"),
    "teacher.head.embed_dim=16",
    "teacher.head.classifier=true",
    # a student without BatchNorm or dropout: its gradients do not depend on how the global
    # batch is split across processes (SyncBatchNorm needs GPUs)
    *tiny_overrides("student", "text"),
    "student.text.config_overrides.hidden_dropout_prob=0.0",
    "student.text.config_overrides.attention_probs_dropout_prob=0.0",
    "student.head.classifier=true",
    "student.head.embed_dim=16",
    "losses=kd",
    "data.train_labels=true",
    "losses.contrastive.weight=0.5",  # contrastive: negatives from both processes
    "data.demo.num_train=64",
    "data.demo.num_val=16",
    "data.demo.num_test=32",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "distill.cache=true",
    "run.latency_seconds=0.02",
]


def train_py(run_dir: Path, *overrides: str) -> None:
    result = subprocess.run(
        [sys.executable, "train.py", *COMMON, *overrides, f"run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def files(run_dir: Path) -> set[str]:
    return {
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and "teacher_cache" not in p.parts and p.suffix != ".png"
    }


@pytest.mark.slow
def test_two_process_run_matches_one_process_run(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_py(one, "trainer.devices=1", "data.batch_size=16")
    # the same global batch: 2 processes x 8 samples (DistributedSampler interleaves them)
    train_py(two, "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=8")
    assert files(one) == files(two)
    assert len(list((two / "teacher_cache").iterdir())) == 2  # train + val, built by both
    assert_runs_match(one, two, 1e-6, "2 vs 1 process")
