"""Issue 14, damaged and mis-specified WebDataset shards (findings 5, 6, 8, 21, 22): a short or
damaged shard raises, or under data.on_error=skip is counted with every sample it lost; globs
name shards; train / val / test sharing a sample is refused; unlabelled class indices name the
key to set."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmkd.data import build_splits
from mmkd.data.base import Skipped
from mmkd.data.datamodule import RoleCollate
from mmkd.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "eel"]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pack(folder: Path, prefix: str, sizes: list[int], index: bool = True) -> list[Path]:
    """Shards as `mmkd pack` leaves them: PREFIX-NNNNNN.tar and, with `index`, shards.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, entries = [], {}
    for shard, size in enumerate(sizes):
        path = folder / f"{prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(size):
                label = CLASSES[i % 3]
                sink.write({"__key__": f"{prefix}{shard}_{i}", "png": png(i), "cls": label})
        entries[path.name] = {"samples": size, "bytes": path.stat().st_size}
        paths.append(path)
    if index:
        data = {"format": 1, "shards": entries, "class_names": CLASSES}
        (folder / "shards.json").write_text(json.dumps(data))
    return paths


def cut_on_sample_boundary(path: Path, keep: int) -> None:
    """Rewrite `path` as a valid tar holding only its first `keep` samples (2 members each)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][: 2 * keep]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


def cut_inside_a_file(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6) + 100])  # mid-way through a png


def webdataset_cfg(data_cfg, train: Path, val: Path, on_error: str = "raise", **extra):
    return data_cfg(
        "webdataset",
        on_error=on_error,
        webdataset={"train": str(train), "val": str(val), **extra},
    )


def skip_count(samples: list) -> int:
    collate = RoleCollate({}, train=True, keep_labels=True, num_classes=3, on_error="skip")
    return collate(samples)["skipped"]


@pytest.mark.parametrize("cut", ["sample_boundary", "inside_file"])
def test_short_or_damaged_shard_raises_or_counts_its_missing_samples(tmp_path, data_cfg, cut):
    """Findings 5 and 6: 300 samples packed, the shard cut; training must not see 280 samples
    as if they were all there, and under skip the count must include the lost ones."""
    (shard,) = write_pack(tmp_path / "train", "train", [30])
    write_pack(tmp_path / "val", "val", [3])
    if cut == "sample_boundary":
        cut_on_sample_boundary(shard, keep=28)
    else:
        cut_inside_a_file(shard)
    with pytest.raises(DataError, match=r"train-000000\.tar"):
        splits = build_splits(webdataset_cfg(data_cfg, tmp_path / "train", tmp_path / "val"))
        list(splits.train)
    splits = build_splits(webdataset_cfg(data_cfg, tmp_path / "train", tmp_path / "val", "skip"))
    samples = list(splits.train)
    assert len(samples) == 30  # the epoch keeps the packed length
    read = [s for s in samples if not isinstance(s, Skipped)]
    assert 0 < len(read) <= 28
    assert skip_count(samples) == 30 - len(read)


def test_shard_globs_are_expanded(tmp_path, data_cfg):
    """Finding 21: the README's `data.webdataset.val='shards/val-*.tar'`."""
    write_pack(tmp_path, "train", [4, 4])
    write_pack(tmp_path / "v", "val", [2, 3])
    cfg = data_cfg(
        "webdataset",
        webdataset={"train": str(tmp_path / "train-*.tar"), "val": str(tmp_path / "v/val-*.tar")},
    )
    splits = build_splits(cfg)
    assert len(splits.train) == 8 and len(splits.val) == 5
    with pytest.raises(ConfigError, match=r"data\.webdataset\.val: no shard matches"):
        build_splits(webdataset_cfg(data_cfg, tmp_path / "train-*.tar", tmp_path / "nope-*.tar"))


def test_labels_without_shards_json_name_the_class_names_key(tmp_path, data_cfg):
    """Finding 22: the error names data.webdataset.class_names (not the classifier switch)."""
    write_pack(tmp_path / "train", "train", [4], index=False)
    write_pack(tmp_path / "val", "val", [2], index=False)
    with pytest.raises(ConfigError, match=r"set data\.webdataset\.class_names"):
        build_splits(webdataset_cfg(data_cfg, tmp_path / "train", tmp_path / "val"))
    cfg = webdataset_cfg(
        data_cfg, tmp_path / "train", tmp_path / "val", class_names=["cat", "dog", "eel"]
    )
    assert build_splits(cfg).class_names == CLASSES


def test_val_or_test_sharing_a_sample_with_train_is_refused(tmp_path, data_cfg):
    """Finding 8: a val shard holding a train sample id is refused in one line."""
    write_pack(tmp_path / "train", "train", [4, 4])
    (leak,) = write_pack(tmp_path / "val", "val", [3])
    (tmp_path / "test").mkdir()
    with wds.TarWriter(str(tmp_path / "test" / "test-000000.tar")) as sink:
        sink.write({"__key__": "train1_2", "png": png(0), "cls": "cat"})  # a train sample
    with pytest.raises(ConfigError, match=r"data\.webdataset\.test: sample 'train1_2' .* train"):
        build_splits(
            webdataset_cfg(
                data_cfg, tmp_path / "train", leak, test=str(tmp_path / "test" / "test-000000.tar")
            )
        )
    splits = build_splits(webdataset_cfg(data_cfg, tmp_path / "train", leak))  # disjoint: fine
    assert len(splits.val) == 3
