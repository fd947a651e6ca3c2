"""The decoded-sample cache (data.decode_cache): exact pixels and samples, rebuilt when a file
changes, resumed after a killed build, and the same batches as without it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd.data import build_splits
from mmkd.data.base import Skipped
from mmkd.data.decode import read_audio, read_image
from mmkd.data.decode_cache import DecodedDataset, decoded, open_or_build
from mmkd.errors import ConfigError


def image_tree(media, root: str = "imgs") -> Path:
    media.png(f"{root}/a/rgb.png", size=(12, 10), mode="RGB")
    media.png(f"{root}/a/gray.png", size=(7, 9), mode="L")
    media.png(f"{root}/b/palette.png", size=(8, 8), mode="P")
    media.png(f"{root}/b/alpha.png", size=(5, 6), mode="RGBA")
    path = media.path(f"{root}/b/photo.jpg")
    pixels = np.random.default_rng(1).integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=80)
    return media.path(root)


def folder_train(data_cfg, root: Path, **overrides):
    cfg = data_cfg("folder", folder={"train": str(root), "val_size": 1}, **overrides)
    return cfg, build_splits(cfg).train


def test_cached_images_are_the_decoded_files_pixels(media, data_cfg, tmp_path):
    root = image_tree(media)
    cfg, train = folder_train(data_cfg, root, decode_cache="true", decode_cache_dir=str(tmp_path))
    cached = decoded(train, cfg, "train")
    assert isinstance(cached, DecodedDataset) and len(cached) == len(train)
    for i in range(len(train)):
        sample = cached[i]
        image = read_image(root / sample["id"])
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGB")  # palette images are stored as RGB
        expected = np.asarray(image)
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == expected.shape
        assert np.array_equal(sample["image"], expected), sample["id"]
        assert sample["label"] == train[i]["label"] and sample["id"] == train[i]["id"]


def test_cached_audio_is_the_decoded_waveform(media, data_cfg, tmp_path):
    media.wav("snd/x/a.wav", samples=900, rate=8000)
    media.wav("snd/x/b.wav", samples=500, channels=2, rate=16000, subtype="PCM_24")
    media.wav("snd/y/c.flac", samples=700, rate=8000)
    cfg, train = folder_train(
        data_cfg, media.path("snd"), decode_cache="true", decode_cache_dir=str(tmp_path)
    )
    cached = decoded(train, cfg, "train")
    for i in range(len(cached)):
        wave, rate = cached[i]["audio"]
        expected, expected_rate = read_audio(media.path("snd") / cached[i]["id"])
        assert wave.dtype == np.float32 and rate == expected_rate
        assert np.array_equal(wave, expected)


def test_a_changed_file_rebuilds_the_entry(media, data_cfg, tmp_path):
    root = image_tree(media)
    cfg, train = folder_train(data_cfg, root, decode_cache="true", decode_cache_dir=str(tmp_path))
    first = decoded(train, cfg, "train")
    index = next(i for i in range(len(first)) if first[i]["id"] == "a/rgb.png")
    before = np.array(first[index]["image"])
    new = np.full((10, 12, 3), 7, dtype=np.uint8)
    Image.fromarray(new).save(root / "a" / "rgb.png")
    stat = os.stat(root / "a" / "rgb.png")
    os.utime(root / "a" / "rgb.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = decoded(build_splits(cfg).train, cfg, "train")
    assert second.folder != first.folder
    assert np.array_equal(second[index]["image"], new) and not np.array_equal(before, new)
    # unchanged data: the same entry is opened again, not rebuilt
    assert decoded(build_splits(cfg).train, cfg, "train").folder == second.folder


class Killed(RuntimeError):
    pass


class CountingDataset(torch.utils.data.Dataset):
    """Wraps a file-backed dataset: counts loads, and can die at one index (a killed build)."""

    def __init__(self, inner, die_at: int | None = None) -> None:
        self.inner = inner
        self.die_at = die_at
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.inner)

    def sample_id(self, index: int) -> str:
        return self.inner.sample_id(index)

    def decode_sources(self, index: int):
        return self.inner.decode_sources(index)

    def __getitem__(self, index: int):
        if index == self.die_at:
            raise Killed(f"killed at {index}")
        self.loaded.append(index)
        return self.inner[index]


def test_a_killed_build_resumes_at_the_first_missing_chunk(media, data_cfg, tmp_path):
    for i in range(9):
        media.png(f"many/c/{i}.png", size=(6, 6), mode="RGB")
    cfg = data_cfg("folder", folder={"train": str(media.path("many")), "val_size": 1})
    base = build_splits(cfg).train.dataset  # the FolderDataset itself (9 files)
    dying = CountingDataset(base, die_at=5)
    with pytest.raises(Killed):
        open_or_build(dying, tmp_path, "raise", None, chunk_size=2, progress=False)
    assert dying.loaded == [0, 1, 2, 3, 4]  # chunks [0,1] and [2,3] done, [4,5] interrupted
    resumed = CountingDataset(base)
    cached = open_or_build(resumed, tmp_path, "raise", None, chunk_size=2, progress=False)
    assert resumed.loaded == [4, 5, 6, 7, 8]
    for i in range(9):
        assert np.array_equal(cached[i]["image"], np.asarray(base[i]["image"]))


def test_skipped_files_stay_skipped_and_limits_are_checked(media, data_cfg, tmp_path):
    root = image_tree(media)
    (root / "a" / "broken.png").write_bytes(b"not an image")
    cfg, train = folder_train(
        data_cfg, root, on_error="skip", decode_cache="true", decode_cache_dir=str(tmp_path)
    )
    cached = decoded(train, cfg, "train")
    marks = [cached[i] for i in range(len(cached)) if isinstance(cached[i], Skipped)]
    assert [m.id for m in marks] == ["a/broken.png"] and "cannot be decoded" in marks[0].reason
    cfg.decode_cache_max_gb = 1e-7  # 100 bytes
    with pytest.raises(ConfigError, match=r"data\.decode_cache_max_gb"):
        decoded(train, cfg, "train")
    cfg.decode_cache = "auto"  # auto leaves a split over the limit uncached
    assert decoded(train, cfg, "train") is train
    cfg.decode_cache = "sometimes"
    with pytest.raises(ConfigError, match=r"data\.decode_cache: .sometimes"):
        decoded(train, cfg, "train")


def test_a_worker_copy_maps_the_files_again(media, data_cfg, tmp_path):
    import pickle

    root = image_tree(media)
    cfg, train = folder_train(data_cfg, root, decode_cache="true", decode_cache_dir=str(tmp_path))
    cached = decoded(train, cfg, "train")
    cached[0]
    assert cached._maps  # opened lazily, on first read
    copy = pickle.loads(pickle.dumps(cached))
    assert copy._maps == {} and np.array_equal(copy[0]["image"], cached[0]["image"])


def test_training_batches_are_the_same_with_and_without_the_cache(media, data_cfg, tmp_path):
    """The cache changes where pixels come from, not the batches: same ids, same views."""
    from mmkd.adapters.image import ImagePreprocessor
    from mmkd.data.datamodule import DistillDataModule

    for name in ("x", "y"):
        for i in range(6):
            media.png(f"tree/{name}/{i}.png", size=(8, 8), mode="RGB")
    data_config = {
        "input_size": (3, 8, 8),
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    train = {"scale": (0.08, 1.0), "hflip": 0.5, "color_jitter": 0.0, "crop_padding": 2}
    pre = {"student": ImagePreprocessor(data_config, train, "convert")}
    batches = {}
    for mode in ("true", "false"):
        cfg = data_cfg(
            "folder",
            folder={"train": str(media.path("tree")), "val_size": 2},
            batch_size=4,
            num_workers=0,
            decode_cache=mode,
            decode_cache_dir=str(tmp_path),
        )
        module = DistillDataModule(cfg, build_splits(cfg), pre, pre, seed=3)
        assert isinstance(module.train_set, DecodedDataset) == (mode == "true")
        assert isinstance(module.val_set, DecodedDataset) == (mode == "true")
        batches[mode] = list(module.train_dataloader())
    for cached, plain in zip(batches["true"], batches["false"], strict=True):
        assert cached["ids"] == plain["ids"] and cached["views"] == plain["views"]
        assert torch.equal(
            cached["inputs"]["student"]["pixels"], plain["inputs"]["student"]["pixels"]
        )


def test_a_bad_setting_fails_at_start_up():
    from mmkd.config import compose, validate

    for override, key in (
        ("data.decode_cache=sometimes", "data.decode_cache:"),
        ("data.decode_cache_max_gb=0", "data.decode_cache_max_gb:"),
    ):
        with pytest.raises(ConfigError, match=key):
            validate(compose([override]))
    validate(compose(["data.decode_cache=false"]))  # a YAML boolean is accepted
