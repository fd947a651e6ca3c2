"""Several teachers at once: each frozen and outside the optimizer, DDP and checkpoints, with its
own loss terms, store entry (features included) and metric names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tiny import small_run, tiny_overrides, tiny_spec, typed_spec

from mmkd.adapters import build_adapter
from mmkd.config import compose, validate
from mmkd.config.schema import Config
from mmkd.distill_module import DistillModule
from mmkd.errors import ConfigError
from mmkd.store import TeacherStore
from mmkd.train import main


def teacher_spec(name: str) -> OmegaConf:
    return typed_spec(OmegaConf.to_container(tiny_spec(name)), teacher=True)


def two_teacher_module() -> DistillModule:
    cfg = OmegaConf.structured(Config)
    cfg.teachers = {"image": teacher_spec("image"), "text": teacher_spec("text")}
    cfg.teachers.text.head.classifier = False
    cfg.teachers.image.losses.kd.weight = 1.0
    cfg.teachers.image.losses.similarity.weight = 2.0
    cfg.teachers.image.losses.similarity.pairs = [["block2", "layer2"]]
    cfg.teachers.text.losses.contrastive.weight = 0.5
    cfg.losses.ce.weight = 0.25
    teachers = {
        "image": build_adapter(cfg.teachers.image, key="teachers.image"),
        "text": build_adapter(cfg.teachers.text, key="teachers.text"),
    }
    student = build_adapter(tiny_spec("audio_cnn", head__embed_dim=8), key="student")
    return DistillModule.from_config(cfg, teachers, {"student": student}, ["a", "b", "c"])


def batch_for(module: DistillModule, size: int = 4) -> dict:
    torch.manual_seed(0)
    models = {"student": module.students["student"]}
    models.update({f"teacher_{name}": t for name, t in module.teachers.items()})
    inputs = {
        role: {k: torch.randn_like(v) for k, v in model.example_batch(size).items()}
        for role, model in models.items()
        if role != "teacher_text"
    }
    inputs["teacher_text"] = module.teachers["text"].example_batch(size)
    return {
        "inputs": inputs,
        "ids": [str(i) for i in range(size)],
        "labels": torch.tensor([0, 1, 2, 0][:size]),
        "skipped": 0,
    }


def test_each_teacher_has_its_own_terms_named_by_teacher(monkeypatch) -> None:
    module = two_teacher_module()
    groups = module.losses["student"]
    assert set(groups) == {"image", "text", "labels"}
    assert set(groups["image"].terms) == {"kd", "similarity"}
    assert set(groups["text"].terms) == {"contrastive"}
    assert set(groups["labels"].terms) == {"ce"}
    # the text teacher's space is reached through its own projection (no embedding term on image)
    assert groups["text"].to_teacher.out_features == 16 and groups["image"].to_teacher is None
    assert module.teacher_features("image")[0].layer == "layer2"
    assert module.teacher_features("text") == ()
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(module, "log_dict", lambda d, **_: logged.update(d))
    monkeypatch.setattr(module, "log", lambda k, v, **_: logged.__setitem__(k, v))
    total = module.training_step(batch_for(module), 0)
    assert set(logged) == {
        "train/image/kd",
        "train/image/similarity",
        "train/text/contrastive",
        "train/ce",
        "train/loss",
    }
    expected = (
        logged["train/image/kd"]
        + 2.0 * logged["train/image/similarity"]
        + 0.5 * logged["train/text/contrastive"]
        + 0.25 * logged["train/ce"]
    )
    assert torch.isclose(total, expected)


def test_teachers_stay_out_of_parameters_checkpoints_and_ddp(tmp_path: Path) -> None:
    module = two_teacher_module()
    module.train()
    teacher_tensors = {
        id(t)
        for teacher in module.teachers.values()
        for t in (*teacher.parameters(), *teacher.buffers())
    }
    assert all(not t.training for t in module.teachers.values())
    assert not teacher_tensors & {id(p) for p in module.parameters()}
    assert not any(k.startswith("teacher") for k in module.state_dict())
    # DDP wraps, broadcasts and all-reduces what the module registers: never a teacher
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
        wrapped = {id(p) for p in ddp.parameters()} | {id(b) for b in ddp.buffers()}
        assert wrapped and not teacher_tensors & wrapped
    finally:
        dist.destroy_process_group()


def test_one_teacher_or_several_not_both() -> None:
    two = ["experiment=av_digits_two_teachers", "teachers.image.weights=/x"]
    validate(compose(two))
    with pytest.raises(ConfigError, match="not both"):
        validate(compose([*two, "teacher=minilm"]))
    with pytest.raises(ConfigError, match=r"losses\.kd\.weight: with several teachers"):
        validate(compose([*two, "losses.kd.weight=1"]))
    with pytest.raises(ConfigError, match=r"teachers\.text\.losses\.ce\.weight: ce does not"):
        validate(compose([*two, "data.train_labels=true", "teachers.text.losses.ce.weight=1"]))
    with pytest.raises(ConfigError, match=r"teachers\.image\.losses\.kd\.temperature"):
        validate(compose([*two, "teachers.image.losses.kd.temperature=0"]))


class RecordOptimized(pl.Callback):
    """What the trainer optimizes and which tensors its strategy's model holds."""

    def on_train_end(self, trainer: pl.Trainer, module: DistillModule) -> None:
        self.optimized = {
            id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]
        }
        self.model = {id(p) for p in trainer.strategy.model.parameters()}
        self.teachers = {id(p) for t in module.teachers.values() for p in t.parameters()}


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("image_teacher")
    assert (
        main(
            [
                *small_run(),
                f"run.dir={run_dir}",
                "teacher=none",
                "losses=supervised",
                "data.train_labels=true",
                *tiny_overrides("student", "image"),
                "student.head.classifier=true",
                "student.head.embed_dim=16",
            ]
        )
        == 0
    )
    return run_dir / "student"


def test_two_teachers_train_one_audio_student_from_their_stores(image_teacher, tmp_path) -> None:
    from mmkd.train import train

    store = tmp_path / "store"
    record = RecordOptimized()
    overrides = [
        *small_run(),
        f"run.dir={tmp_path / 'run'}",
        "teacher=none",
        "losses=supervised",
        "losses.ce.weight=0",
        "data.train_labels=false",
        f"teachers.image.weights={image_teacher}",
        "teachers.image.losses.kd.weight=1",
        "teachers.image.losses.attention.weight=10",
        "teachers.image.losses.attention.pairs=[[block2,layer2]]",
        *tiny_overrides("teachers.text", "text"),
        "teachers.text.head.classifier=false",
        "teachers.text.losses.contrastive.weight=0.5",
        *tiny_overrides("student", "audio_cnn"),
        "student.head.classifier=true",
        "distill.cache=true",
        f"distill.cache_dir={store}",
        "trainer.log_every_n_steps=1",
    ]
    metrics = train(compose(overrides), callbacks=[record])
    # optimizer and the strategy's model: the student and loss parts, never a teacher
    assert record.optimized and not record.optimized & record.teachers
    assert not record.model & record.teachers
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith(("students.", "losses.")) for k in ckpt["state_dict"])
    # one store entry per teacher and split; the image teacher's keeps its attention maps
    entries = [TeacherStore.open(p) for p in store.iterdir() if not p.name.endswith(".partial")]
    assert len(entries) == 4
    features = sorted(tuple(e.meta["features"]) for e in entries)
    assert features == [(), (), ("layer2@attention",), ("layer2@attention",)]
    with (tmp_path / "run" / "logs" / "metrics.csv").open() as handle:
        columns = set(next(csv.reader(handle)))
    assert {"train/image/kd", "train/image/attention", "train/text/contrastive"} <= columns
    assert {"time/image/store_build_s", "time/text/store_build_s"} <= columns
    assert "teacher_image/accuracy" in metrics and "student/accuracy" in metrics
    # named teachers get agreement metrics, under their slot's role
    assert 0 <= metrics["student/teacher_image_agreement"] <= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["student/accuracy"] == metrics["student/accuracy"]
