"""Lightning loggers chosen by `run.loggers`, the run's config and final metrics sent to each,
and the one reader of the CSV log (`RUN_DIR/logs/metrics.csv`).

Every logger writes under the run folder: `logs/metrics.csv` (csv), `tensorboard/`
(tensorboard), `mlruns/` (mlflow, a local file store unless `run.mlflow_tracking_uri` is set)
and `wandb/` (wandb, offline unless `run.wandb_offline=false`).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from mmkd.errors import ConfigError
from mmkd.io import write_text
from mmkd.registry import Registry

LOG_DIR = "logs"
CSV_FILE = "metrics.csv"


@dataclass(frozen=True)
class LoggerKind:
    """How to build one logger, and the packages it needs (any one of them)."""

    build: Callable[[DictConfig, Path], Logger]
    packages: tuple[str, ...] = ()
    extra: str = ""  # the pip extra that installs them


LOGGERS: Registry[LoggerKind] = Registry("logger")


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a metrics.csv already there is continued, not deleted (a
    resumed run keeps the rows logged before its checkpoint)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class ResumedCSVLogger(CSVLogger):
    """CSVLogger appending to the metrics.csv of the run it resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _csv(cfg: DictConfig, run_dir: Path) -> Logger:
    kind = ResumedCSVLogger if cfg.run.resume else CSVLogger
    return kind(save_dir=str(run_dir), name="", version=LOG_DIR)


def _tensorboard(cfg: DictConfig, run_dir: Path) -> Logger:
    return TensorBoardLogger(
        save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False
    )


def _mlflow(cfg: DictConfig, run_dir: Path) -> Logger:
    uri = cfg.run.mlflow_tracking_uri
    if not uri:
        uri = (run_dir / "mlruns").resolve().as_uri()
        # MLflow 3 keeps its file store in "maintenance mode" and refuses it unless opted in;
        # it is the one local store that needs no database packages
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(experiment_name=cfg.run.name, run_name=run_dir.name, tracking_uri=uri)


def _wandb(cfg: DictConfig, run_dir: Path) -> Logger:
    run_dir.mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp folder otherwise
    return WandbLogger(
        project=cfg.run.wandb_project or cfg.run.name,
        name=run_dir.name,
        save_dir=str(run_dir),
        offline=cfg.run.wandb_offline,
    )


LOGGERS.register("csv")(LoggerKind(_csv))
LOGGERS.register("tensorboard")(
    LoggerKind(_tensorboard, ("tensorboard", "tensorboardX"), "tensorboard")
)
LOGGERS.register("mlflow")(LoggerKind(_mlflow, ("mlflow",), "mlflow"))
LOGGERS.register("wandb")(LoggerKind(_wandb, ("wandb",), "wandb"))


def check_loggers(names: Iterable[str]) -> None:
    """Start-up check: every name is known and its package is installed."""
    for name in names:
        kind = LOGGERS.get(name, key="run.loggers")
        if kind.packages and not any(importlib.util.find_spec(p) for p in kind.packages):
            raise ConfigError(
                f"run.loggers: {name} needs the {kind.packages[0]} package "
                f"(pip install 'mmkd[{kind.extra}]')"
            )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """One Lightning logger per name in `run.loggers`, each writing under `run_dir`."""
    return [LOGGERS.get(name, key="run.loggers").build(cfg, run_dir) for name in cfg.run.loggers]


class LogRunConfig(pl.Callback):
    """Sends the resolved config to every logger when fitting starts (rank 0 only)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.params: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.params)


def _metric_name(logger: Logger, key: str) -> str:
    if isinstance(logger, MLFlowLogger):  # MLflow allows [A-Za-z0-9_/. -] only (R@1 -> R_at_1)
        return re.sub(r"[^A-Za-z0-9_/. -]", "_", key.replace("@", "_at_"))
    return key


def log_final_metrics(loggers: Iterable[Logger], metrics: Mapping[str, float], step: int) -> None:
    """Send the run's final metrics (metrics.json's keys under `test/`) to every logger.

    TensorBoard gets them with the config as one hparams session (its HParams dashboard); its
    logger writes them at step 0 then."""
    for logger in loggers:
        final = {_metric_name(logger, f"test/{k}"): v for k, v in metrics.items()}
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(logger.hparams, final)
        else:
            logger.log_metrics(final, step)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):  # Lightning leaves the W&B run open until exit
            logger.experiment.finish()


def read_csv_log(run_dir: Path) -> list[dict[str, float]]:
    """The rows of RUN_DIR/logs/metrics.csv, empty cells left out; [] when there is no log."""
    path = run_dir / LOG_DIR / CSV_FILE
    if not path.is_file():
        return []
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


def trim_csv_log(run_dir: Path, step: int) -> int:
    """Drop the rows of RUN_DIR/logs/metrics.csv logged after `step` (a resumed run logs them
    again from its checkpoint); returns how many rows are kept."""
    path = run_dir / LOG_DIR / CSV_FILE
    if not path.is_file():
        return 0
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [row for row in rows if not row.get("step") or float(row["step"]) <= step]
    if len(kept) < len(rows):
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        write_text(path, out.getvalue())
    return len(kept)
