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
from mmkd.config.compose import command_line_keys
from mmkd.config.schema import adapter_schema
from mmkd.data.base import DatasetSplits
from mmkd.errors import CheckpointError, ConfigError
from mmkd.export import SPEC, load_export_spec
from mmkd.roles import adapter_specs, student_slots, teacher_slots

log = logging.getLogger(__name__)


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
        log.info("%s: architecture taken from %s", key, Path(spec.weights) / SPEC)
        apply_command_line(cfg, key, spec, saved)
        # what the spec holds beyond the model (a teacher's `losses`) stays as configured
        losses = spec.get("losses")
        kept = {} if losses is None else {"losses": losses}
        schema = adapter_schema(
            str(saved.adapter),
            f"{key}.adapter",
            None if losses is None else OmegaConf.get_type(losses),
        )
        node = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(saved), kept)
        OmegaConf.update(cfg, key, node, merge=False)


def apply_command_line(cfg: DictConfig, key: str, spec: DictConfig, saved: DictConfig) -> None:
    """Settings of an exported model given on the command line (`teacher.image.hflip=0.0`)
    override the exported spec, and one line says which: they are never dropped. A setting
    that changes the architecture then fails to load the weights, naming them."""
    changed = []
    for item in command_line_keys(cfg):
        if not item.startswith(f"{key}."):
            continue
        sub = item[len(key) + 1 :]
        if (
            sub.split(".")[0] in ("weights", "freeze_encoder")
            or OmegaConf.select(saved, sub, default=_ABSENT) is _ABSENT
        ):
            continue  # kept as configured anyway (a teacher's `losses`, ...)
        value, old = OmegaConf.select(spec, sub), OmegaConf.select(saved, sub)
        if value != old:
            OmegaConf.update(saved, sub, value, merge=True)
            changed.append(f"{sub}={value} (exported: {old})")
    if changed:
        log.warning(
            "%s: command-line override(s) of the exported model applied: %s",
            key,
            ", ".join(changed),
        )


_ABSENT = object()


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


def build_models(
    cfg: DictConfig, splits: DatasetSplits
) -> tuple[dict[str, Adapter], dict[str, Adapter]]:
    """Resolve specs in place; build ({name: teacher}, {role: student}), teachers frozen.

    The loss terms check what they need of the built models (classifiers, classes, layer
    names) when the module builds them, still before any training."""
    adopt_exported_specs(cfg)  # first: an exported model brings its own head and modality
    check_modalities(cfg, splits.modalities)
    resolve_classes(cfg, splits.num_classes)
    teachers: dict[str, Adapter] = {}
    teacher_slot_of = teacher_slots(cfg)
    for name, slot in teacher_slot_of.items():
        teacher = build_adapter(OmegaConf.select(cfg, slot.key), key=slot.key)
        teacher.requires_grad_(False)
        teacher.eval()
        teachers[name] = teacher
    first = next(iter(teachers.values()), None)
    student_slot_of = student_slots(cfg)
    students: dict[str, Adapter] = {}
    for name, slot in student_slot_of.items():
        spec = OmegaConf.select(cfg, slot.key)
        if spec.head.embed_dim is None and first is not None:
            spec.head.embed_dim = first.embed_dim  # the (first) teacher's space
        students[name] = build_adapter(spec, key=slot.key)
    models = {slot.key: teachers[name] for name, slot in teacher_slot_of.items()}
    models.update({slot.key: students[name] for name, slot in student_slot_of.items()})
    for key, model in models.items():  # `features` asked for in a spec: names checked now
        model.check_features(list(model.spec.features), f"{key}.features")
    return teachers, students
