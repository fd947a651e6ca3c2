"""Exported students reload with no teacher and no training code, and ONNX / TorchScript
exports compute what torch computes."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny import small_run, tiny_overrides

from mmkd.cli import main as mmkd_main
from mmkd.data.demo import DemoDataset
from mmkd.export import load_exported
from mmkd.train import main

SMALL = [
    *small_run(train=64),
    "teacher=none",
    "losses=supervised",
    "data.train_labels=true",
]


@pytest.fixture(scope="module", params=["image", "audio_cnn"])
def run_dir(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(request.param)
    assert (
        main(
            [
                *SMALL,
                f"run.dir={run_dir}",
                *tiny_overrides("student", request.param),
                "student.head.classifier=true",
                "student.head.embed_dim=16",
            ]
        )
        == 0
    )
    return run_dir


def real_input(run_dir):
    exported = load_exported(run_dir / "student")
    sample = DemoDataset(_demo_cfg(), "test", 4, 0)[3]
    raw = sample[exported.model.modality]
    pre = exported.preprocessor
    return exported, pre.collate([pre(raw, train=False)])


def _demo_cfg():
    from omegaconf import OmegaConf

    from mmkd.config.schema import DemoCfg

    return OmegaConf.structured(DemoCfg)


def test_onnx_export_matches_torch_on_a_real_input(run_dir, capsys):
    assert mmkd_main(["export", str(run_dir), "--format", "onnx"]) == 0
    path = run_dir / "student" / "model.onnx"
    assert capsys.readouterr().out.strip().endswith("model.onnx")
    exported, batch = real_input(run_dir)
    with torch.no_grad():
        out = exported.model(batch)
    session = ort.InferenceSession(str(path))
    embedding, logits = session.run(None, {k: v.numpy() for k, v in batch.items()})
    np.testing.assert_allclose(embedding, out.embedding.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4)
    # the batch axis is dynamic
    doubled = {k: np.concatenate([v.numpy()] * 3) for k, v in batch.items()}
    assert session.run(None, doubled)[0].shape[0] == 3


def test_torchscript_export_matches_torch(run_dir):
    assert mmkd_main(["export", str(run_dir), "--format", "torchscript"]) == 0
    scripted = torch.jit.load(str(run_dir / "student" / "model.torchscript.pt"))
    exported, batch = real_input(run_dir)
    with torch.no_grad():
        expected = exported.model(batch).embedding
        got = scripted(*batch.values())[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reload_in_a_few_lines_classifies_raw_samples(run_dir):
    exported = load_exported(run_dir / "student")
    meta = json.loads((run_dir / "student" / "meta.json").read_text())
    sample = DemoDataset(_demo_cfg(), "test", 2, 0)[1]
    names = exported.classify([sample[exported.model.modality]])
    assert names[0] in meta["class_names"]


def test_export_of_a_missing_run_fails_cleanly(tmp_path, capsys):
    assert mmkd_main(["export", str(tmp_path), "--format", "onnx"]) == 2
    assert "error:" in capsys.readouterr().err


def test_an_export_loads_in_a_fresh_process(tmp_path):
    """No config composed first: the defaults of the sections an export omits still resolve."""
    import subprocess
    import sys

    from tiny import tiny_spec

    from mmkd.adapters import build_adapter
    from mmkd.export import export_model

    model = build_adapter(tiny_spec("audio_cnn"), key="student")
    export_model(model, tmp_path / "student", class_names=["a", "b", "c"])
    code = (
        "from mmkd.export import load_exported; "
        f"print(load_exported({str(tmp_path / 'student')!r}).model.modality)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "audio"
