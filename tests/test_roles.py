"""Every model's slot (config key, data role, metric prefix, export folder) comes from one place,
for the one-teacher shorthand and for named teachers alike."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from tiny import tiny_spec, typed_spec

from mmkd.config.schema import Config
from mmkd.errors import ConfigError
from mmkd.roles import Slot, is_teacher_role, student_slots, teacher_slots


def config(**teachers: str):
    cfg = OmegaConf.structured(Config)
    for name, kind in teachers.items():
        cfg.teachers[name] = typed_spec(OmegaConf.to_container(tiny_spec(kind)), teacher=True)
    return cfg


def test_the_shorthand_teacher_and_named_teachers_resolve_to_slots() -> None:
    cfg = config()
    cfg.teacher = tiny_spec("image")
    assert teacher_slots(cfg) == {"teacher": Slot("teacher", "teacher", "teacher", "")}
    named = teacher_slots(config(image="image", text="text"))
    assert named["image"] == Slot("image", "teachers.image", "teacher_image", "image/")
    assert list(named) == ["image", "text"]
    assert all(is_teacher_role(slot.role) for slot in named.values())


def test_students_resolve_to_slots_with_their_export_folders() -> None:
    cfg = config()
    cfg.extra_students = {"audio": tiny_spec("audio_cnn")}
    slots = student_slots(cfg)
    assert slots["student"] == Slot("student", "student", "student", "", "student")
    assert slots["audio"] == Slot(
        "audio", "extra_students.audio", "audio", "audio/", "student_audio"
    )
    assert not any(is_teacher_role(slot.role) for slot in slots.values())


@pytest.mark.parametrize("name", ["teacher", "teacher_x", "student"])
def test_an_extra_student_cannot_take_a_teachers_role(name: str) -> None:
    cfg = config()
    cfg.extra_students = {name: tiny_spec("audio_cnn")}
    with pytest.raises(ConfigError, match=f"extra_students.{name}: name must be an identifier"):
        student_slots(cfg)
