"""data.name=hf: local Hugging Face datasets with a column mapping to modalities and labels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from mmkd.data import build_splits
from mmkd.data.datamodule import RoleCollate
from mmkd.errors import ConfigError, DataError

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def png_bytes(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(n: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.linspace(-0.5, 0.5, n, dtype=np.float32), 8000, format="WAV")
    return buffer.getvalue()


def table(n: int, offset: int = 0):
    rows = {
        "img": [{"bytes": png_bytes(offset + i), "path": None} for i in range(n)],
        "sound": [{"bytes": wav_bytes(200 + i), "path": None} for i in range(n)],
        "caption": [f"caption {offset + i}" for i in range(n)],
        "kind": [(offset + i) % 3 for i in range(n)],
        "uid": [f"u{offset + i}" for i in range(n)],
    }
    # cast rather than encode: encoding Audio needs torchcodec, casting stored bytes does not
    data = datasets.Dataset.from_dict(rows)
    data = data.cast_column("img", datasets.Image()).cast_column("sound", datasets.Audio())
    return data.cast_column("kind", datasets.ClassLabel(names=["bird", "cow", "frog"]))


HF_COLUMNS = {
    "columns": {"image": "img", "audio": "sound", "text": "caption"},
    "label_column": "kind",
    "id_column": "uid",
}


def test_save_to_disk_with_column_mapping(tmp_path, data_cfg):
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": table(6), "test": table(3, offset=100)}).save_to_disk(folder)
    splits = build_splits(data_cfg("hf", hf={"path": str(folder), **HF_COLUMNS}))
    assert splits.modalities == ("image", "audio", "text")
    assert splits.class_names == ["bird", "cow", "frog"]
    assert len(splits.train) + len(splits.val) == 6 and len(splits.test) == 3  # val held out
    sample = splits.test[1]
    assert sample["id"] == "u101" and sample["label"] == 101 % 3
    assert sample["text"] == "caption 101" and sample["where"] == "split test row 1"
    assert np.asarray(sample["image"]).shape == (5, 7, 3)
    wave, rate = sample["audio"]
    assert rate == 8000 and wave.shape == (201,)


def test_parquet_files_and_string_labels(tmp_path, data_cfg):
    folder = tmp_path / "pq"
    folder.mkdir()
    rows = {"text": ["a b", "c d", "e f", "g h"], "label": ["yes", "no", "yes", "10"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "validation.parquet"))
    splits = build_splits(data_cfg("hf", hf={"path": str(folder)}))
    assert splits.modalities == ("text",) and splits.class_names == ["10", "no", "yes"]
    assert [splits.val[i]["label"] for i in range(4)] == [2, 1, 2, 0]
    assert splits.val[0]["id"] == "validation:0"


def test_imagefolder_builder_on_a_class_folder(tmp_path, data_cfg, media):
    for name in ("owl", "bee"):
        for i in range(3):
            media.png(f"images/train/{name}/{i}.png", size=(4, 4), mode="RGB")
    cfg = data_cfg("hf", hf={"path": str(tmp_path / "images"), "builder": "imagefolder"})
    splits = build_splits(cfg)
    assert splits.modalities == ("image",) and splits.class_names == ["bee", "owl"]
    labels = sorted(splits.train[i]["label"] for i in range(len(splits.train)))
    labels += [splits.val[i]["label"] for i in range(len(splits.val))]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]


def test_bad_rows_are_named_or_skipped(tmp_path, data_cfg):
    good = table(2)
    broken = good.cast_column("img", datasets.Image(decode=False))
    broken = datasets.concatenate_datasets(
        [broken, broken.select([0]).map(lambda r: {"img": {"bytes": b"junk", "path": None}})]
    )
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": broken, "validation": broken}).save_to_disk(folder)
    cfg = data_cfg("hf", hf={"path": str(folder), **HF_COLUMNS})
    splits = build_splits(cfg)
    with pytest.raises(DataError, match=r"split validation row 2 \(image\) cannot be decoded"):
        splits.val[2]
    cfg.on_error = "skip"
    splits = build_splits(cfg)
    collate = RoleCollate({}, train=False, keep_labels=True, num_classes=3, on_error="skip")
    batch = collate([splits.val[i] for i in range(3)])
    assert batch["ids"] == ["u0", "u1"] and batch["skipped"] == 1


def test_config_errors_name_the_key(tmp_path, data_cfg):
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": table(2)}).save_to_disk(folder)
    with pytest.raises(ConfigError, match=r"data\.hf\.columns\.text: no column 'txt'"):
        build_splits(data_cfg("hf", hf={"path": str(folder), "columns": {"text": "txt"}}))
    with pytest.raises(ConfigError, match=r"data\.hf\.path: required"):
        build_splits(data_cfg("hf"))
