"""Class-folder data (`data.name=folder`): classes, splits, bad files, and evaluating a run on
another folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import tiny_overrides

from mmkd.data import build_splits
from mmkd.data.base import Skipped, sample_ids
from mmkd.errors import ConfigError, DataError
from mmkd.evaluate import main as evaluate_main
from mmkd.train import main as train_main

CLASSES = ("cat", "ant", "bee")  # created out of order: the index is the sorted order


def image_folder(media, root: str, per_class: int = 4, classes=CLASSES) -> str:
    for name in classes:
        for i in range(per_class):
            media.png(f"{root}/{name}/{i:03d}.png", size=(12, 12), mode="RGB")
    return str(media.path(root))


def test_classes_are_the_sorted_folders_and_ids_their_relative_paths(media, data_cfg):
    train = image_folder(media, "train")
    media.raw("train/bee/notes.txt", b"not an image")
    splits = build_splits(data_cfg("folder", folder={"train": train, "val_size": 3}))
    assert splits.class_names == ["ant", "bee", "cat"]
    assert splits.modalities == ("image",)
    assert len(splits.train) == 9 and len(splits.val) == 3 and splits.test is splits.val
    ids = sample_ids(splits.train) + sample_ids(splits.val)
    assert sorted(ids) == sorted(f"{c}/{i:03d}.png" for c in CLASSES for i in range(4))
    sample = splits.train[0]
    assert splits.class_names[sample["label"]] == sample["id"].split("/")[0]
    assert np.asarray(sample["image"]).shape == (12, 12, 3)


def test_the_validation_split_is_fixed_and_a_fraction_or_a_count(media, data_cfg):
    train = image_folder(media, "train", per_class=10)
    first = build_splits(data_cfg("folder", folder={"train": train, "val_size": 0.2}))
    again = build_splits(data_cfg("folder", folder={"train": train, "val_size": 0.2}))
    assert len(first.val) == 6
    assert sample_ids(first.val) == sample_ids(again.val)  # fixed by split_seed
    other = build_splits(
        data_cfg("folder", folder={"train": train, "val_size": 6, "split_seed": 1})
    )
    assert len(other.val) == 6 and sample_ids(other.val) != sample_ids(first.val)


def test_separate_val_and_test_folders(media, data_cfg):
    train = image_folder(media, "train")
    val = image_folder(media, "val", per_class=2)
    test = image_folder(media, "test", per_class=1, classes=("bee",))  # a subset of classes
    splits = build_splits(data_cfg("folder", folder={"train": train, "val": val, "test": test}))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 1)
    assert splits.test[0]["label"] == 1  # bee is still class 1


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda m: m.png("t/a/x.png") and m.wav("t/b/y.wav"), r"mixes audio and image"),
        (lambda m: m.path("t/a/sub").mkdir(parents=True) or m.png("t/b/x.png"), r"a holds no"),
        (lambda m: m.raw("t/a/x.txt", b"x"), r"holds no image or audio files"),
        (lambda m: m.png("t/x.png"), r"no class sub-folders"),
    ],
    ids=["mixed", "empty-class", "no-media", "no-classes"],
)
def test_a_bad_layout_is_a_config_error(media, data_cfg, setup, message):
    setup(media)
    with pytest.raises(ConfigError, match=rf"^data\.folder\.train: .*{message}"):
        build_splits(data_cfg("folder", folder={"train": str(media.path("t"))}))


def test_unknown_class_in_a_val_folder_is_named(media, data_cfg):
    train = image_folder(media, "train")
    val = image_folder(media, "val", per_class=1, classes=("cat", "dog"))
    with pytest.raises(ConfigError, match=r"data\.folder\.val: class folder\(s\) dog"):
        build_splits(data_cfg("folder", folder={"train": train, "val": val}))


def test_a_bad_file_is_named_or_skipped(media, data_cfg, caplog):
    train = image_folder(media, "train")
    media.raw("train/ant/broken.png", b"\x89PNG not really")
    folder = {"train": train, "val_size": 1}
    splits = build_splits(data_cfg("folder", folder=folder))
    position = sample_ids(splits.train).index("ant/broken.png")
    with pytest.raises(DataError, match=r"ant/broken\.png cannot be decoded"):
        splits.train[position]
    skipping = build_splits(data_cfg("folder", folder=folder, on_error="skip"))
    assert isinstance(skipping.train[position], Skipped)


def test_a_run_on_folders_and_its_evaluation_on_another_folder(media, tmp_path, capsys):
    train = image_folder(media, "train", per_class=6)
    other = image_folder(media, "other", per_class=3)
    run_dir = tmp_path / "run"
    code = train_main(
        [
            *tiny_overrides("student", "image"),
            "student.head.classifier=true",
            "teacher=none",
            "losses=supervised",
            "data.train_labels=true",
            "data.name=folder",
            f"data.folder.train={train}",
            "data.folder.val_size=3",
            "data.batch_size=8",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "run.latency_seconds=0.02",
            f"run.dir={run_dir}",
        ]
    )
    assert code == 0
    capsys.readouterr()
    assert evaluate_main([str(run_dir), f"data.folder.test={other}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= printed["student/accuracy"] <= 1.0
    written = list((run_dir / "eval").glob("*/metrics.json"))
    assert len(written) == 1
    counts = json.loads(written[0].read_text())
    assert counts.get("data/skipped_samples", 0) == 0
