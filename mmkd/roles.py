"""Every model of a run resolved once into a `Slot`: its name, config key, data role, metric
prefix and export folder.

The config names teachers in two ways (`teacher` for the one-teacher shorthand, `teachers.NAME`
for several) and students in two (`student`, `extra_students.NAME`); everything downstream (the
loaders, the loss groups and their metrics, the store, evaluation, export) asks the slot instead
of applying the naming rules itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from omegaconf import DictConfig

from mmkd.errors import ConfigError

SHORTHAND = "teacher"  # the name of the one teacher of `teacher=...`
MAIN_STUDENT = "student"  # the name of `student`
TEACHER_ROLE_PREFIX = "teacher_"  # data role of teachers.NAME: teacher_NAME
RESERVED_ROLES = ("teacher", "student")  # nor teacher_NAME: extra students may not take them


@dataclass(frozen=True)
class Slot:
    """One model of the run."""

    name: str  # "teacher" or NAME of teachers.NAME; "student" or NAME of extra_students.NAME
    key: str  # its config key: teacher, teachers.NAME, student, extra_students.NAME
    role: str  # its input in a batch and its test metrics (ROLE/accuracy): teacher_NAME, NAME
    metric_prefix: str  # its training metrics' prefix: "" (the one teacher, student) or "NAME/"
    export_folder: str = ""  # a student's export folder in the run: student, student_NAME


def teacher_slot(name: str) -> Slot:
    """The slot of teacher `name` ("teacher": the one-teacher shorthand)."""
    if name == SHORTHAND:
        return Slot(name, "teacher", "teacher", "")
    return Slot(name, f"teachers.{name}", f"{TEACHER_ROLE_PREFIX}{name}", f"{name}/")


def student_slot(name: str) -> Slot:
    """The slot of student `name` ("student": the main student)."""
    if name == MAIN_STUDENT:
        return Slot(name, "student", "student", "", "student")
    return Slot(name, f"extra_students.{name}", name, f"{name}/", f"student_{name}")


def teacher_slots(cfg: DictConfig) -> dict[str, Slot]:
    """The run's teachers by name: the shorthand's one, or those of `teachers`."""
    if cfg.teacher is not None:
        return {SHORTHAND: teacher_slot(SHORTHAND)}
    return {str(name): teacher_slot(str(name)) for name in cfg.teachers}


def student_slots(cfg: DictConfig) -> dict[str, Slot]:
    """The run's students by name: "student", then those of `extra_students` (whose names must
    be identifiers that cannot be taken for a teacher's role)."""
    slots = {MAIN_STUDENT: student_slot(MAIN_STUDENT)}
    for name in cfg.extra_students:
        if is_teacher_role(str(name)) or name in RESERVED_ROLES or not str(name).isidentifier():
            raise ConfigError(
                f"extra_students.{name}: name must be an identifier other than "
                f"{' or '.join(RESERVED_ROLES)}"
            )
        slots[str(name)] = student_slot(str(name))
    return slots


def is_teacher_role(role: str) -> bool:
    """Whether data role `role` is a teacher's ("teacher" or "teacher_NAME")."""
    return role == SHORTHAND or role.startswith(TEACHER_ROLE_PREFIX)


def adapter_specs(cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """(key, spec) for every model in the run: teacher(s), student and extra students."""
    if cfg.teacher is not None:
        yield "teacher", cfg.teacher
    for name, spec in cfg.teachers.items():
        yield f"teachers.{name}", spec
    yield "student", cfg.student
    for name, spec in cfg.extra_students.items():
        yield f"extra_students.{name}", spec


def loss_sections(
    cfg: DictConfig, one_teacher: bool | None = None
) -> Iterator[tuple[str, DictConfig, str, str | None]]:
    """(config key, losses section, scope, teacher name) of every group of loss terms: the
    one-teacher `losses` (every term), or with `teachers` each teacher's `losses` (its terms)
    and the top-level `losses` (label terms). `one_teacher`: whether the shorthand's teacher
    exists (default: whether `teacher` is set)."""
    if cfg.teachers:
        for name, spec in cfg.teachers.items():
            yield f"teachers.{name}.losses", spec.losses, "teacher", str(name)
        yield "losses", cfg.losses, "labels", None
    else:
        one = cfg.teacher is not None if one_teacher is None else one_teacher
        yield "losses", cfg.losses, "all", SHORTHAND if one else None
