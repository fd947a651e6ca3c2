"""`mmkd evaluate RUN_DIR` on tiny generated data, and the retrieval metrics."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import small_run, tiny_overrides

from mmkd.evaluate import main as evaluate_main
from mmkd.metrics import retrieval_metrics
from mmkd.train import main as train_main


@pytest.fixture(scope="module")
def bind_run(tmp_path_factory):
    """A text teacher binding an audio student and an image student (tiny, demo data)."""
    run_dir = tmp_path_factory.mktemp("bind")
    code = train_main(
        [
            *tiny_overrides("teacher", "text"),
            "teacher.head.classifier=false",
            "teacher.head.embed_dim=16",
            *tiny_overrides("student", "audio_cnn"),
            "student.head.classifier=false",
            *tiny_overrides("extra_students.image", "image"),
            "extra_students.image.head.classifier=false",
            *small_run(test=30),
            f"run.dir={run_dir}",
        ]
    )
    assert code == 0
    return run_dir


def test_evaluate_prints_the_run_metrics_keys_as_json(bind_run, capsys):
    assert evaluate_main([str(bind_run), "data.demo.num_test=20"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    run_metrics = json.loads((bind_run / "metrics.json").read_text())
    assert set(metrics) == {k for k in run_metrics if not k.startswith("data/train_")}
    for key in (
        "student/accuracy",
        "image/accuracy",
        "teacher/accuracy",
        "student/f1",
        "retrieval/audio_to_image/R@1",
        "retrieval/image_to_audio/mAP",
        "student/teacher_cosine",
        "student/latency_ms",
        "image/params",
    ):
        assert key in metrics, key
    out = bind_run / "eval" / "data.demo.num_test=20"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "embedding_space.png").stat().st_size > 0
    assert (out / "confusion_student.png").is_file()


def test_evaluate_reports_a_bad_run_dir_in_one_line(tmp_path, capsys):
    assert evaluate_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_retrieval_metrics_match_a_hand_computed_case():
    queries = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    gallery = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]])
    labels_q = torch.tensor([0, 0])
    labels_g = torch.tensor([1, 0, 0])
    # query 0 ranks gallery 0 (wrong class), 2, 1: relevant at ranks 2 and 3 -> AP = (1/2+2/3)/2
    # query 1 ranks gallery 1, 2, 0: relevant at ranks 1 and 2 -> AP = 1
    found = retrieval_metrics(queries, gallery, labels_q, labels_g)
    assert found["R@1"] == pytest.approx(0.5)
    assert found["R@5"] == pytest.approx(1.0)
    assert found["mAP"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)
