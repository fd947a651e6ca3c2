"""mmkd train [experiment=NAME] [group=name ...] [key.path=value ...]

Build, fit, evaluate on the test split, export. (`python train.py ...` in a clone is the same.)

A finished run writes to run.dir:
    config.yaml    the resolved config
    checkpoints/   Lightning checkpoints (student state only)
    logs/          metrics.csv (training curves) and the other run.loggers' files
    student/       the exported student (see mmkd.export)
    metrics.json   final test metrics, written last
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from mmkd.adapters import adapter_sections
from mmkd.callbacks import EpochTimer, TrackTrainedBatches
from mmkd.checkpoint import (
    CheckpointOnInterrupt,
    SafeCheckpointIO,
    checkpoint_estimate,
    previous_path,
    resume_checkpoint,
)
from mmkd.cli import command_parser
from mmkd.config import compose, validate
from mmkd.config.schema import DataCfg
from mmkd.data import build_splits, dataset_sections
from mmkd.data.base import class_prompts
from mmkd.data.check import check_decodes
from mmkd.data.datamodule import DistillDataModule
from mmkd.distill_module import DistillModule
from mmkd.errors import ConfigError, MMKDError
from mmkd.evaluate import evaluate_models
from mmkd.export import export_model
from mmkd.io import check_free_space, write_json, write_text
from mmkd.loggers import LogRunConfig, build_loggers, log_final_metrics, trim_csv_log
from mmkd.models import build_models
from mmkd.plots import plot_training_curves
from mmkd.report import format_summary
from mmkd.roles import adapter_specs
from mmkd.run_lock import run_dir_lock
from mmkd.teacher_source import check_student_views, fit_view_policy, stores_dir

log = logging.getLogger("mmkd")

RUN_DIR_ENV = "MMKD_RUN_DIR"  # shares a generated run dir with DDP worker processes


def resolve_run_dir(cfg: DictConfig) -> Path:
    """run.dir, or runs/<name>-<timestamp> chosen by the launching process and inherited by
    the DDP workers Lightning starts (they have LOCAL_RANK > 0)."""
    if not cfg.run.dir:
        if os.environ.get("LOCAL_RANK", "0") != "0" and RUN_DIR_ENV in os.environ:
            cfg.run.dir = os.environ[RUN_DIR_ENV]
        else:  # a new run, even when one process trains several in a row
            cfg.run.dir = f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            os.environ[RUN_DIR_ENV] = cfg.run.dir
    return Path(cfg.run.dir)


def absolute_data_paths(data: DictConfig) -> None:
    """Make data paths absolute, so the saved config works from any folder (mmkd.evaluate):
    `data.root` and the path keys each section of the chosen dataset declares (`paths`)."""
    keys = [*DataCfg.paths]
    for name, section in dataset_sections(data.name).items():
        keys += [f"{name}.{key}" for key in section.paths]
    absolute_paths(data, keys)


def absolute_model_paths(cfg: DictConfig) -> None:
    """The path keys each model's adapter sections declare (`paths`; the built-in ones declare
    none, as their sources may be hub ids), made absolute like the data paths."""
    for key, spec in adapter_specs(cfg):
        sections = adapter_sections(spec.adapter, f"{key}.adapter").items()
        absolute_paths(spec, [f"{name}.{field}" for name, cls in sections for field in cls.paths])


def absolute_paths(node: DictConfig, keys: Sequence[str]) -> None:
    """Each of `keys` of `node` that holds a relative path, resolved against the working folder."""
    for key in keys:
        value = OmegaConf.select(node, key)
        if value and not Path(value).is_absolute():
            OmegaConf.update(node, key, str(Path(value).resolve()))


class RunInterrupted(MMKDError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signal: str, checkpoint: Path) -> None:
        super().__init__(
            f"{signal}: stopped; checkpoint saved to {checkpoint}. Run the same "
            "command with run.resume=true to continue."
        )
        self.exit_code = 130 if signal == "SIGINT" else 143  # the shell's 128 + signal number


def check_run_dir(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, if any; refuses to overwrite another run's outputs."""
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = last.exists() or previous_path(last).exists()
    if cfg.run.resume:
        if not saved:
            log.warning("run.resume=true but %s does not exist: starting from scratch", last)
            return None
        return resume_checkpoint(last)  # falls back to the previous good one, saying so
    if saved or (run_dir / "metrics.json").exists():
        raise ConfigError(
            f"run.dir: {run_dir} already holds a run; choose another run.dir, "
            "or set run.resume=true to continue it"
        )
    return None


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback] = ()
) -> pl.Trainer:
    """The Lightning Trainer of a run: `trainer.*` settings, checkpoints in RUN_DIR/checkpoints,
    the loggers of `run.loggers` (each sent the resolved config)."""
    t = cfg.trainer
    kwargs: dict[str, Any] = OmegaConf.to_container(t, resolve=True)  # type: ignore[assignment]
    extra = kwargs.pop("extra")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.run.checkpoint_every_n_steps,
        enable_version_counter=False,  # always last.ckpt, also in a moved run folder
    )
    try:
        return pl.Trainer(
            **kwargs,
            **extra,
            default_root_dir=str(run_dir),
            callbacks=[
                checkpoint,
                EpochTimer(),
                LogRunConfig(cfg),
                TrackTrainedBatches(),  # the loader's place in the epoch, for checkpoints
                *callbacks,
            ],
            plugins=[SafeCheckpointIO()],
            logger=build_loggers(cfg, run_dir),
        )
    except (ValueError, TypeError, MisconfigurationException) as err:
        # Lightning checks accelerator / strategy / precision combinations here
        raise ConfigError(f"trainer: {str(err).splitlines()[0]}") from None


def train(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, float]:
    """Run one experiment end to end and return its final metrics (extra Lightning
    `callbacks` are added to the Trainer)."""
    validate(cfg)
    run_dir = resolve_run_dir(cfg)
    with run_dir_lock(run_dir):
        return _train_in(cfg, run_dir, callbacks)


def _train_in(cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback]) -> dict[str, float]:
    """`train` once this process holds the run folder."""
    resume = check_run_dir(cfg, run_dir)
    absolute_data_paths(cfg.data)
    absolute_model_paths(cfg)
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    splits = build_splits(cfg.data)
    teachers, students = build_models(cfg, splits)
    prompts = class_prompts(splits.class_names, cfg.data.prompt_template)
    module = DistillModule.from_config(cfg, teachers, students, splits.class_names, prompts)
    test_pre = {role: model.make_preprocessor() for role, model in students.items()}
    slots = module.teacher_slots
    for name, teacher in teachers.items():
        test_pre[slots[name].role] = teacher.make_preprocessor()
    used = [(name, module.teacher_sources[name]) for name in teachers if module.teacher_used(name)]
    # training reads a teacher's input only when it runs live (stored outputs need none)
    unread = {slots[name].role for name in teachers} - {
        slots[name].role for name, source in used if source.needs_input
    }
    fit_pre = {role: pre for role, pre in test_pre.items() if role not in unread}
    views = fit_view_policy([source for _, source in used], cfg.run.seed)
    check_student_views([source for _, source in used], students)
    # token ids of each split's texts, kept beside the teacher stores (mmkd.data.tokens)
    tokens = stores_dir(cfg.distill.cache_dir, run_dir) / "tokens"
    datamodule = DistillDataModule(
        cfg.data, splits, fit_pre, test_pre, seed=cfg.run.seed, views=views, token_cache_dir=tokens
    )
    if cfg.data.check_eval_data:  # a bad val / test file fails now, not after an epoch
        check_decodes([("val", datamodule.val_set), ("test", datamodule.test_set)])
    interrupt = CheckpointOnInterrupt(run_dir / "checkpoints" / "last.ckpt")
    trainer = build_trainer(cfg, run_dir, [interrupt, *callbacks])
    if trainer.is_global_zero:
        if resume is not None:  # rows logged after the checkpoint will be logged again
            step = torch.load(resume, weights_only=True, mmap=True)["global_step"]
            trim_csv_log(run_dir, int(step))
        # room for a new checkpoint beside the last one, before any work
        check_free_space(run_dir, checkpoint_estimate(module), "checkpoints in")
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except (KeyboardInterrupt, SystemExit):
        if interrupt.signal is None:
            raise
        raise RunInterrupted(interrupt.signal, interrupt.path) from None
    if not trainer.is_global_zero:  # rank 0 alone evaluates and writes the outputs
        return {}
    skipped = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("skipped_samples")
    }
    return finish(cfg, run_dir, module, datamodule, skipped)


def finish(
    cfg: DictConfig,
    run_dir: Path,
    module: DistillModule,
    datamodule: DistillDataModule,
    training_counts: dict[str, float] | None = None,
) -> dict[str, float]:
    """Export, evaluate on the test split, plot, write metrics.json last, print the summary."""
    class_names = datamodule.splits.class_names
    if cfg.run.export:
        for role, student in module.students.items():
            export_model(
                student,
                run_dir / module.student_slots[role].export_folder,
                class_names=class_names,
                class_embeddings=module.class_embeddings,
            )
    plot_training_curves(run_dir, run_dir / "plots" / "training.png")
    metrics: dict[str, float] = {}
    if cfg.run.test:
        models = dict(module.students.items())
        models.update({module.teacher_slots[n].role: t for n, t in module.teachers.items()})
        metrics = evaluate_models(
            models,
            datamodule.test_dataloader(),
            class_names=class_names,
            class_embeddings=module.class_embeddings,
            out_dir=run_dir / "plots",
            latency_seconds=cfg.run.latency_seconds,
            device=module.device,
        )
    metrics.update({f"data/{k.replace('/', '_')}": v for k, v in (training_counts or {}).items()})
    log_final_metrics(module.loggers, metrics, module.global_step)
    write_json(run_dir / "metrics.json", metrics)
    if metrics:  # run.test=false leaves nothing to tabulate
        print(format_summary(metrics, run_dir))
    return metrics


def command(argv: Sequence[str]) -> int:
    """`mmkd train [overrides]`: compose the config, train, print the summary."""
    args = command_parser("train", __doc__, overrides=True).parse_args(argv)
    train(compose(args.overrides))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`mmkd train` through the shared command-line wrapper (kept for `python train.py`)."""
    from mmkd.cli import run_command

    return run_command("train", argv)
