"""Evaluate trained models, after training and from the command line.

    mmkd evaluate RUN_DIR [key=value ...]

loads the exported student(s) of RUN_DIR, and its teacher when it can be built, evaluates them
on the test split of the data the run's config names — overrides such as
`data.fsdd.root=/some/folder data.fsdd.split=all` point it elsewhere — and writes
RUN_DIR/eval/<name>/metrics.json (same keys as the run's metrics.json) with plots beside it. The
last line of standard output is the metrics as one JSON object. The numbers come from
`mmkd.metrics`, the pictures from `mmkd.plots`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader

from mmkd.adapters import Adapter, build_adapter
from mmkd.cli import add_overrides, command_parser
from mmkd.config.compose import compose_saved, describe_config_error
from mmkd.data import build_splits
from mmkd.data.datamodule import DistillDataModule
from mmkd.errors import CheckpointError, ConfigError, MMKDError
from mmkd.export import STUDENT, export_folder, load_exported
from mmkd.io import write_json
from mmkd.metrics import collect, compute_metrics, model_costs
from mmkd.plots import plot_evaluation
from mmkd.roles import MAIN_STUDENT, is_teacher_role, student_slots, teacher_slots

log = logging.getLogger(__name__)


def evaluate_models(
    models: Mapping[str, Adapter],
    loader: DataLoader,
    *,
    class_names: list[str],
    class_embeddings: Tensor | None,
    out_dir: Path | None,
    latency_seconds: float,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Metrics (and, with `out_dir`, plots) of `models` on `loader`. Used after training and by
    the command line, so a run's metrics.json and a later evaluation share their keys."""
    collected = collect(models, loader, class_embeddings, device)
    teachers = [role for role in models if is_teacher_role(role)]
    metrics = compute_metrics(collected, len(class_names), teachers)
    if out_dir is not None:
        plot_evaluation(collected, class_names, out_dir)
    metrics.update(model_costs(models, collected, latency_seconds))
    return metrics


# --------------------------------------------------------------------------- command line


def load_run_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """A run's saved config.yaml with `overrides` merged in (and its plugins imported)."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; is this a run folder?")
    try:
        return compose_saved(OmegaConf.load(config_file), overrides)
    except ConfigError as err:
        raise ConfigError(f"{run_dir}: {err}") from None
    except Exception as err:  # omegaconf errors name the key
        raise ConfigError(f"{run_dir}: {describe_config_error(err)}") from None


def load_run_models(run_dir: Path, cfg: DictConfig) -> tuple[dict[str, Adapter], Tensor | None]:
    """The exported students of a run, plus its teacher when that can still be built."""
    students = {
        slot.role: load_exported(run_dir / slot.export_folder)
        for slot in student_slots(cfg).values()
        if slot.name == MAIN_STUDENT or (run_dir / slot.export_folder).is_dir()
    }
    models: dict[str, Adapter] = {role: e.model for role, e in students.items()}
    for slot in teacher_slots(cfg).values():
        try:
            models[slot.role] = build_adapter(OmegaConf.select(cfg, slot.key), key=slot.key).eval()
        except (MMKDError, OSError) as err:
            log.warning("%s not evaluated (%s)", slot.key, err)
    return models, students[MAIN_STUDENT].class_embeddings


def slug(overrides: Sequence[str]) -> str:
    """A folder name for an evaluation with `overrides` ("test" without any)."""
    text = "_".join(overrides) or "test"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", text)[:120]


def command(argv: Sequence[str]) -> int:
    """`mmkd evaluate RUN_DIR [key=value ...]`: evaluate a finished run's exported models."""
    parser = command_parser("evaluate", __doc__)
    parser.add_argument("run_dir", type=Path, help="a finished run folder (holding student/)")
    add_overrides(parser)
    args = parser.parse_args(argv)
    run_dir, overrides = args.run_dir, args.overrides
    cfg = load_run_config(run_dir, overrides)
    if not export_folder(run_dir, STUDENT).is_dir():
        raise CheckpointError(f"{run_dir}: no exported student (student/); did the run finish?")
    splits = build_splits(cfg.data)
    models, class_embeddings = load_run_models(run_dir, cfg)
    test_preprocessors = {role: m.make_preprocessor() for role, m in models.items()}
    data = DistillDataModule(cfg.data, splits, {}, test_preprocessors, seed=cfg.run.seed)
    out_dir = run_dir / "eval" / slug(overrides)
    metrics = evaluate_models(
        models,
        data.test_dataloader(),
        class_names=splits.class_names,
        class_embeddings=class_embeddings,
        out_dir=out_dir,
        latency_seconds=cfg.run.latency_seconds,
    )
    write_json(out_dir / "metrics.json", metrics)
    print(f"wrote {out_dir / 'metrics.json'}")
    print(json.dumps(metrics, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`mmkd evaluate` through the shared command-line wrapper."""
    from mmkd.cli import run_command

    return run_command("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
