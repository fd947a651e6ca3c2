"""Resolve the model specs that depend on data or on other models, then build the models.

Resolution fills in what a config leaves open, so the saved config.yaml is explicit:
- a `weights` folder exported by a run (DIR/student) brings its own adapter spec;
- `head.num_classes` comes from the dataset's classes;
- a student's `head.embed_dim` defaults to its teacher's embedding dimension.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmkd.adapters import ADAPTERS, Adapter, build_adapter
from mmkd.adapters.build import EXPORT_SPEC, load_export_spec
from mmkd.config.validate import adapter_specs
from mmkd.data.base import DatasetSplits
from mmkd.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RESERVED_ROLES = ("teacher", "student")


def student_roles(cfg: DictConfig) -> dict[str, str]:
    """role -> config key of every student, e.g. {"student": "student", "image":
    "extra_students.image"}."""
    roles = {"student": "student"}
    for name in cfg.extra_students:
        if name in RESERVED_ROLES or not str(name).isidentifier():
            raise ConfigError(
                f"extra_students.{name}: name must be an identifier other than "
                f"{' or '.join(RESERVED_ROLES)}"
            )
        roles[str(name)] = f"extra_students.{name}"
    return roles


def exported_spec(weights: str, key: str) -> DictConfig | None:
    """The adapter spec saved beside exported weights, or None if `weights` is a plain file."""
    folder = Path(weights)
    if not folder.exists():
        raise ConfigError(f"{key}.weights: {weights} does not exist")
    if not folder.is_dir():
        return None
    try:
        return load_export_spec(folder)
    except CheckpointError as err:
        raise ConfigError(f"{key}.weights: {err}") from None


def adopt_exported_specs(cfg: DictConfig) -> None:
    """Replace each spec whose weights are an exported folder by that folder's spec."""
    for key, spec in list(adapter_specs(cfg)):
        if not spec.weights:
            continue
        saved = exported_spec(spec.weights, key)
        if saved is None:
            continue
        saved.weights = spec.weights
        saved.freeze_encoder = spec.freeze_encoder
        log.info("%s: architecture taken from %s", key, Path(spec.weights) / EXPORT_SPEC)
        OmegaConf.update(cfg, key, saved, merge=False)


def resolve_classes(cfg: DictConfig, num_classes: int) -> None:
    """Set every classifier head's num_classes from the dataset (in place)."""
    for key, spec in adapter_specs(cfg):
        head = spec.head
        if not head.classifier or head.num_classes is not None:
            continue
        if not num_classes:
            raise ConfigError(
                f"{key}.head.classifier: the dataset {cfg.data.name!r} has no "
                "class labels; set head.classifier=false"
            )
        head.num_classes = num_classes


def check_modalities(cfg: DictConfig, available: tuple[str, ...]) -> None:
    """Every model must read a modality the dataset carries (checked before building them)."""
    for key, spec in adapter_specs(cfg):
        modality = ADAPTERS.get(spec.adapter, key=f"{key}.adapter").modality
        if modality not in available:
            raise ConfigError(
                f"{key}.adapter: {spec.adapter} reads {modality}, but data "
                f"{cfg.data.name!r} provides {', '.join(available)}"
            )


def check_kd_heads(cfg: DictConfig) -> None:
    """losses.kd compares class distributions: every model needs a classifier."""
    if cfg.losses.kd.weight <= 0:
        return
    for key, spec in adapter_specs(cfg):
        if not spec.head.classifier:
            raise ConfigError(
                f"{key}.head.classifier: losses.kd needs class logits from every "
                "model (set it true, or losses.kd.weight=0)"
            )


def check_kd_classes(
    cfg: DictConfig, teacher: Adapter | None, students: dict[str, Adapter], keys: dict[str, str]
) -> None:
    """losses.kd needs the same classes on the teacher and every student."""
    if cfg.losses.kd.weight <= 0 or teacher is None:
        return
    for role, student in students.items():
        if student.num_classes != teacher.num_classes:
            raise ConfigError(
                f"{keys[role]}.head.num_classes: losses.kd compares class distributions, but "
                f"the student has {student.num_classes} classes and the teacher "
                f"{teacher.num_classes}"
            )


def build_models(
    cfg: DictConfig, splits: DatasetSplits
) -> tuple[Adapter | None, dict[str, Adapter]]:
    """Resolve specs in place; build (teacher, {role: student}) with the teacher frozen."""
    adopt_exported_specs(cfg)  # first: an exported model brings its own head and modality
    check_modalities(cfg, splits.modalities)
    check_kd_heads(cfg)
    resolve_classes(cfg, splits.num_classes)
    teacher = None
    if cfg.teacher is not None:
        teacher = build_adapter(cfg.teacher, key="teacher")
        teacher.requires_grad_(False)
        teacher.eval()
    keys = student_roles(cfg)
    students: dict[str, Adapter] = {}
    for role, key in keys.items():
        spec = OmegaConf.select(cfg, key)
        if spec.head.embed_dim is None and teacher is not None:
            spec.head.embed_dim = teacher.embed_dim
        students[role] = build_adapter(spec, key=key)
    check_kd_classes(cfg, teacher, students, keys)
    return teacher, students
