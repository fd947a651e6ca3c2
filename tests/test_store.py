"""Teacher-output cache: hit, miss, invalidation, damage, refusal, and the same training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny import small_run, tiny_overrides, tiny_spec

from mmkd.adapters import build_adapter
from mmkd.cache import TeacherCache, open_or_build
from mmkd.config.schema import DemoCfg
from mmkd.data.demo import DemoDataset
from mmkd.data.module import RoleCollate
from mmkd.errors import CheckpointError, ConfigError
from mmkd.export import load_exported
from mmkd.train import main

IDENTITY = {"data": "demo", "size": 24}


def teacher(**overrides):
    model = build_adapter(tiny_spec("image", **overrides), key="teacher")
    return model.eval()


def build(root, model, dataset):
    collate = RoleCollate(
        {"teacher": model.make_preprocessor()}, train=False, keep_labels=False, num_classes=0
    )
    return open_or_build(
        root,
        model,
        dataset,
        collate,
        IDENTITY,
        batch_size=8,
        device=torch.device("cpu"),
        build=True,
    )


@pytest.fixture(scope="module")
def dataset():
    return DemoDataset(OmegaConf.structured(DemoCfg), "train", 24, 0)


def test_miss_then_hit_serves_what_the_teacher_computes(tmp_path, dataset):
    model = teacher()
    folder, built = build(tmp_path, model, dataset)
    assert built
    again, built_again = build(tmp_path, model, dataset)
    assert again == folder and not built_again  # a hit: nothing recomputed
    cache = TeacherCache.open(folder)
    ids = [dataset[i]["id"] for i in (5, 0, 17)]
    embedding, logits = cache.lookup(ids)
    pre = model.make_preprocessor()
    batch = pre.collate([pre(dataset[i]["image"], train=False) for i in (5, 0, 17)])
    with torch.no_grad():
        live = model(batch)
    torch.testing.assert_close(embedding, live.embedding, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, live.logits, atol=1e-6, rtol=1e-5)
    assert len(cache) == 24
    with pytest.raises(CheckpointError, match="not in it"):
        cache.lookup(["no-such-sample"])


def test_new_weights_or_preprocessing_make_a_new_entry(tmp_path, dataset):
    model = teacher()
    first, _ = build(tmp_path, model, dataset)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    second, built = build(tmp_path, model, dataset)
    assert built and second != first
    resized = teacher(image__img_size=28)
    third, built = build(tmp_path, resized, dataset)
    assert built and third not in (first, second)


def test_damaged_entry_is_reported_and_rebuilt(tmp_path, dataset, caplog):
    model = teacher()
    folder, _ = build(tmp_path, model, dataset)
    array = folder / "embedding.npy"
    array.write_bytes(array.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"embedding\.npy"):
        TeacherCache.open(folder)
    again, built = build(tmp_path, model, dataset)
    assert again == folder and built
    assert "rebuilding" in caplog.text
    meta = json.loads((folder / "meta.json").read_text())
    assert np.load(folder / "embedding.npy").shape == tuple(meta["arrays"]["embedding"]["shape"])


def test_cache_is_refused_when_the_teacher_input_is_augmented(tmp_path, dataset):
    with pytest.raises(ConfigError, match="randomly augmented"):
        build(tmp_path, teacher(image__augment=True), dataset)


def test_cached_and_live_teacher_train_the_same_student(tmp_path):
    common = [
        *tiny_overrides("teacher", "image"),
        "teacher.head.embed_dim=16",
        "teacher.head.classifier=true",
        *tiny_overrides("student", "audio_cnn"),
        "student.head.classifier=true",
        "losses=kd",
        "losses.embed.weight=0.5",
        "data.train_labels=true",
        *small_run(epochs=2),
    ]
    assert main([*common, "distill.cache=false", f"run.dir={tmp_path / 'live'}"]) == 0
    assert main([*common, "distill.cache=true", f"run.dir={tmp_path / 'cached'}"]) == 0
    assert len(list((tmp_path / "cached" / "teacher_cache").iterdir())) == 2  # train, val
    live = load_exported(tmp_path / "live" / "student").model.state_dict()
    cached = load_exported(tmp_path / "cached" / "student").model.state_dict()
    for key, value in live.items():
        torch.testing.assert_close(cached[key], value, atol=1e-5, rtol=1e-4)
