"""The real FSDD / MNIST / AV-digits data under ../shared/data (skipped where it is absent)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmkd.data import build_splits
from mmkd.data.fsdd import official_split
from mmkd.errors import ConfigError

SPEAKERS = ["george", "jackson", "lucas", "nicolas", "yweweler"]


def ids(dataset) -> list[str]:
    return [dataset.sample_id(i) for i in range(len(dataset))]


def clip_parts(name: str) -> tuple[int, str, int]:
    digit, speaker, index = name.removesuffix(".wav").split("_")
    return int(digit), speaker, int(index)


def test_fsdd_official_splits(shared_data, data_cfg):
    splits = build_splits(data_cfg("fsdd", root=str(shared_data)))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2025, 225, 250)
    test = [clip_parts(name) for name in ids(splits.test)]
    assert all(index < 5 for _, _, index in test)
    assert Counter(speaker for _, speaker, _ in test) == dict.fromkeys(SPEAKERS, 50)
    assert Counter(digit for digit, _, _ in test) == dict.fromkeys(range(10), 25)
    train, val = set(ids(splits.train)), set(ids(splits.val))
    assert not train & val and all(clip_parts(n)[2] >= 5 for n in train | val)
    item = splits.val[0]
    wave, rate = item["audio"]
    assert rate == 8000 and wave.ndim == 1 and wave.dtype == np.float32
    assert 0.1 < len(wave) / rate < 2.5 and item["label"] == clip_parts(item["id"])[0]
    every = build_splits(data_cfg("fsdd", root=str(shared_data), fsdd={"split": "all"}))
    assert len(every.test) == 2500


def test_fsdd_speakers_filter(shared_data, data_cfg):
    root = str(shared_data / "fsdd" / "recordings")
    cfg = data_cfg("fsdd", fsdd={"root": root, "speakers": ["george", "lucas"], "split": "train"})
    splits = build_splits(cfg)
    assert len(splits.test) == 900 and len(splits.train) + len(splits.val) == 900
    assert {clip_parts(n)[1] for n in ids(splits.test)} == {"george", "lucas"}
    present = ", ".join(SPEAKERS)
    with pytest.raises(ConfigError, match=rf"unknown speaker\(s\) theo; .* has {present}"):
        build_splits(data_cfg("fsdd", fsdd={"root": root, "speakers": ["theo"]}))


def test_mnist_counts_and_labels(shared_data, data_cfg):
    splits = build_splits(
        data_cfg("mnist", root=str(shared_data), prompt_template="a handwritten {name}")
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    test_labels = splits.test.part.labels
    assert test_labels.min() == 0 and test_labels.max() == 9
    assert np.bincount(test_labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert len(splits.train.dataset) == 60000
    item = splits.test[0]
    assert item["image"].shape == (28, 28) and item["image"].dtype == np.uint8
    assert item["label"] == 7 and item["text"] == "a handwritten seven"
    whole = build_splits(data_cfg("mnist", root=str(shared_data), mnist={"split": "train"}))
    assert len(whole.test) == 60000


def pairs(dataset) -> list[tuple[str, str]]:
    return [tuple(name.split("+")) for name in ids(dataset)]


def test_av_digits_pairs(shared_data, data_cfg):
    def build(**overrides):
        return build_splits(data_cfg("av_digits", root=str(shared_data), **overrides))

    splits = build()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2025, 225, 250)
    for dataset, side in ((splits.train, "train"), (splits.val, "train"), (splits.test, "test")):
        for clip, images, image in dataset.pairs:
            assert images.part.name == side
            assert dataset.audio.clips[clip].digit == images.part.labels[image]
        used = [image for _, image in pairs(dataset)]
        assert len(set(used)) == len(used)  # no image reused within a split
    val_images = {int(image.rsplit("-", 1)[1]) for _, image in pairs(splits.val)}
    train_images = {int(image.rsplit("-", 1)[1]) for _, image in pairs(splits.train)}
    assert not val_images & train_images
    assert val_images <= set(build_splits(data_cfg("mnist", root=str(shared_data))).val.indices)
    item = splits.test[0]
    assert item["label"] == clip_parts(item["id"].split("+")[0])[0]
    assert item["image"].shape == (28, 28) and item["audio"][1] == 8000
    assert pairs(build().train) == pairs(splits.train)
    other = pairs(build(av_digits={"pair_seed": 1}).train)
    assert [clip for clip, _ in other] == [clip for clip, _ in pairs(splits.train)]
    assert sum(a != b for a, b in zip(other, pairs(splits.train), strict=True)) > 1900


def test_av_digits_split_all_and_several_images(shared_data, data_cfg):
    splits = build_splits(
        data_cfg(
            "av_digits",
            root=str(shared_data),
            fsdd={"split": "all"},
            av_digits={"images_per_clip": 2},
        )
    )
    assert len(splits.test) == 5000 and len(splits.train) == 4050
    for clip, image in pairs(splits.test):
        assert image.startswith(f"mnist-{official_split(clip_parts(clip)[2])}-")
    grouped = pairs(splits.train)
    assert all(grouped[i][0] == grouped[i + 1][0] for i in range(0, 4050, 2))  # 2 per clip
    assert len({image for _, image in grouped}) == 4050  # all distinct
