"""run.loggers: Lightning's loggers write under the run folder; the config and the final
metrics reach each of them (read back from TensorBoard event files and the MLflow store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import small_run, tiny_overrides

from mmkd.errors import ConfigError
from mmkd.loggers import check_loggers, read_csv_log
from mmkd.train import main

SUPERVISED = [
    "teacher=none",
    "losses=supervised",
    "data.train_labels=true",
    *tiny_overrides("student", "image"),
    "student.head.classifier=true",
    *small_run(train=32, test=16, epochs=2),
    "trainer.log_every_n_steps=1",
    "optim.lr=0.0021",  # looked for in the logged config
]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run_dir = tmp_path_factory.mktemp("logged")
    overrides = [*SUPERVISED, "run.loggers=[csv,tensorboard,mlflow]", f"run.dir={run_dir}"]
    assert main(overrides) == 0
    return run_dir


def test_csv_log_stays_where_it_was(logged_run):
    rows = read_csv_log(logged_run)
    assert any("train/loss" in row for row in rows)
    final = json.loads((logged_run / "metrics.json").read_text())
    logged_final = {k: v for row in rows for k, v in row.items() if k.startswith("test/")}
    assert logged_final["test/student/accuracy"] == pytest.approx(final["student/accuracy"])


def test_tensorboard_events_hold_the_metrics(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = logged_run / "tensorboard"
    events = EventAccumulator(str(folder)).Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "val/loss" in tags
    final = json.loads((logged_run / "metrics.json").read_text())
    (accuracy,) = events.Scalars("test/student/accuracy")
    assert accuracy.value == pytest.approx(final["student/accuracy"])
    # the resolved config went in as the hyperparameters of an hparams session
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    sessions = [
        HParamsPluginData.FromString(content).session_start_info
        for content in events.PluginTagToContent("hparams").values()
    ]
    hparams = next(s.hparams for s in sessions if s.hparams)
    assert hparams["optim/lr"].number_value == pytest.approx(0.0021)
    assert hparams["student/timm/model"].string_value == "resnet10t"


def test_mlflow_store_holds_the_run_params_and_metrics(logged_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants the opt-in
    store = logged_run / "mlruns"
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "demo_bind"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == logged_run.name
    assert run.data.params["optim/lr"] == "0.0021"
    assert run.data.params["student/adapter"] == "image"
    final = json.loads((logged_run / "metrics.json").read_text())
    assert run.data.metrics["test/student/accuracy"] == pytest.approx(final["student/accuracy"])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 2  # one point per logged step, not only the last


def test_unknown_or_missing_logger_fails_at_start(tmp_path, capsys):
    assert main([*SUPERVISED, "run.loggers=[csv,tensorbord]", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "run.loggers: unknown logger 'tensorbord'. Did you mean 'tensorboard'?" in err
    assert not (tmp_path / "config.yaml").exists()


def test_a_logger_without_its_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"run.loggers: wandb needs .*pip install 'mmkd\[wandb\]'"
    ):
        check_loggers(["csv", "wandb"])


def test_wandb_runs_offline_under_the_run_folder(tmp_path):
    """Not in the dev extra (CI skips it); with wandb installed, nothing leaves the machine."""
    pytest.importorskip("wandb")
    assert main([*SUPERVISED, "run.loggers=[wandb]", f"run.dir={tmp_path}"]) == 0
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()  # W&B's record file: the config keys and the final metrics
    assert b"optim" in data and b"test/student/accuracy" in data
