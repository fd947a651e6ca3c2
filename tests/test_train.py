"""End-to-end runs of train.py on the demo data with tiny models: the run-output contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from tiny import tiny_overrides

from mmkd.config import compose
from mmkd.export import load_exported
from mmkd.train import main, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data.demo.num_train=96",
    "data.demo.num_val=32",
    "data.demo.num_test=48",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "run.latency_seconds=0.05",
]
CONTRACT_KEYS = (
    "student/accuracy",
    "teacher/accuracy",
    "student/params",
    "teacher/params",
    "student/latency_ms",
    "teacher/latency_ms",
)


def supervised(adapter: str) -> list[str]:
    """A teacher-less tiny `adapter` student trained from labels."""
    return [
        "teacher=none",
        "losses=supervised",
        "data.train_labels=true",
        *tiny_overrides("student", adapter),
        "student.head.classifier=true",
    ]


def run(run_dir: Path, *overrides: str) -> dict[str, float]:
    assert main([*SMALL, f"run.dir={run_dir}", *overrides]) == 0
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """Supervised tiny image model: the teacher of the cross-modal run below."""
    run_dir = tmp_path_factory.mktemp("image_teacher")
    run(
        run_dir,
        *supervised("image"),
        "student.head.embed_dim=16",
    )
    return run_dir


def test_run_writes_the_output_contract(image_run):
    metrics = json.loads((image_run / "metrics.json").read_text())
    assert {"student/accuracy", "student/params", "student/latency_ms"} <= metrics.keys()
    assert 0.0 <= metrics["student/accuracy"] <= 1.0
    assert metrics["student/latency_ms"] > 0
    config = OmegaConf.load(image_run / "config.yaml")
    assert config.student.head.num_classes == 9  # resolved from the data before saving
    assert config.run.dir == str(image_run)
    assert (image_run / "checkpoints" / "last.ckpt").is_file()
    assert (image_run / "logs" / "metrics.csv").is_file()
    exported = load_exported(image_run / "student")
    assert exported.class_names[0] == "red circle"
    assert exported.model.num_classes == 9


def test_cross_modal_run_with_exported_teacher(image_run, tmp_path):
    """The exported image model teaches an audio student on paired samples, labels withheld."""
    metrics = run(
        tmp_path,
        f"teacher.weights={image_run / 'student'}",
        "losses=kd",
        "losses.ce.weight=0",
        "losses.contrastive.weight=0.5",
        "data.train_labels=false",
        *tiny_overrides("student", "audio_cnn"),
        "student.head.classifier=true",
    )
    assert set(CONTRACT_KEYS) <= metrics.keys()
    assert metrics["teacher/params"] > metrics["student/params"]
    config = OmegaConf.load(tmp_path / "config.yaml")
    assert config.teacher.adapter == "image"  # the architecture came from the export
    assert config.student.head.embed_dim == 16  # a student takes its teacher's dimension

    # checkpoints hold the student (and loss parameters) only, never the teacher
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert keys and all(k.startswith(("students.", "losses.")) for k in keys)

    # the exported student runs on a raw sample with no teacher and no training code
    from mmkd.data.demo import DemoDataset

    sample = DemoDataset(OmegaConf.structured(config.data.demo), "test", 1, 0)[0]
    exported = load_exported(tmp_path / "student")
    assert exported.model.modality == "audio"
    out = exported([sample["audio"]])
    assert out.embedding.shape == (1, 16)
    assert len(exported.classify([sample["audio"]])) == 1


def test_metrics_json_only_after_a_finished_run(tmp_path):
    code = main([*SMALL, f"run.dir={tmp_path}", "student.adapter=nope"])
    assert code == 2
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_train_py_script_runs_from_the_command_line(tmp_path):
    """`python train.py` as a user types it (subprocess, default experiment, shortened)."""
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            *SMALL,
            f"run.dir={tmp_path}",
            *tiny_overrides("student", "image"),
            "student.head.classifier=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "teacher/student" in result.stdout
    assert (tmp_path / "metrics.json").is_file()


def test_same_seed_gives_the_same_run(tmp_path):
    overrides = [*supervised("audio_cnn"), "run.seed=3"]
    first = run(tmp_path / "a", *overrides)
    second = run(tmp_path / "b", *overrides)
    assert first["student/accuracy"] == second["student/accuracy"]
    a = load_exported(tmp_path / "a" / "student").model.state_dict()
    b = load_exported(tmp_path / "b" / "student").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class EncoderDtypes(pl.Callback):
    """Records the dtype of the student encoder's output at every training-mode forward."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.students["student"].encoder.register_forward_hook(self.record)

    def record(self, module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        if module.training:  # not validation, test or latency timing
            self.dtypes.append(out.dtype)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    probe = EncoderDtypes()
    overrides = [*SMALL, f"run.dir={tmp_path}", *supervised("image")]
    metrics = train(compose([*overrides, "trainer.precision=bf16-mixed"]), callbacks=[probe])
    assert 0.0 <= metrics["student/accuracy"] <= 1.0
    assert len(probe.dtypes) == 6  # 96 samples / 16: every training step ran in bfloat16
    assert set(probe.dtypes) == {torch.bfloat16}


@pytest.mark.slow
def test_compiled_student_trains_and_exports(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    metrics = run(
        tmp_path,
        *supervised("audio_cnn"),
        "distill.compile_student=true",
    )
    assert 0.0 <= metrics["student/accuracy"] <= 1.0
    # dynamo captured and compiled the student's forward (nothing else here is compiled)
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert counters["frames"]["ok"] >= 1, dict(counters["frames"])
    keys = load_exported(tmp_path / "student").model.state_dict().keys()
    assert not any("_orig_mod" in k for k in keys)
