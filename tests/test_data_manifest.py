"""Manifest datasets: JSONL / CSV rows with image, audio and text columns."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmkd.data import build_splits
from mmkd.data.base import Skipped
from mmkd.errors import ConfigError, DataError


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line; a str row is written as is (for malformed lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def clips(media) -> Path:
    """A data folder with two images and two clips under data/, manifests go beside them."""
    media.png("data/img/a.png")
    media.png("data/img/b.png", mode="RGB")
    media.wav("data/wav/a.wav", samples=400)
    media.wav("data/wav/b.wav", samples=200, channels=2)
    return media.folder / "data"


def row(name: str, label: Any = None, **extra: Any) -> dict[str, Any]:
    out = {"image": f"img/{name}.png", "audio": f"wav/{name}.wav", "text": f"a {name}", **extra}
    return out if label is None else {**out, "label": label}


def build(data_cfg, train: Path, **manifest: Any):
    return build_splits(data_cfg("manifest", manifest={"train": str(train), **manifest}))


def test_jsonl_manifest_items_and_relative_paths(clips, data_cfg, monkeypatch, tmp_path):
    train = write_jsonl(clips / "train.jsonl", [row("a", "dog"), row("b", "cat", id="b-1")])
    monkeypatch.chdir(tmp_path / "data" / "img")  # paths resolve against the manifest, not cwd
    splits = build(data_cfg, Path("../train.jsonl"), val=str(train))
    assert splits.modalities == ("image", "audio", "text")
    assert splits.class_names == ["cat", "dog"]
    first, second = splits.val[0], splits.val[1]
    assert first["id"] == "train.jsonl:1" and first["label"] == 1 and first["text"] == "a a"
    assert isinstance(first["image"], Image.Image) and first["image"].mode == "L"
    wave, rate = first["audio"]
    assert wave.shape == (400,) and rate == 8000
    assert second["id"] == "b-1" and second["label"] == 0
    assert second["audio"][0].shape == (200, 2)  # stereo stays 2-D
    assert splits.test is splits.val  # test None: the validation split


def test_absolute_paths_and_text_only(clips, data_cfg, tmp_path):
    rows = [{"audio": str(clips / "wav/a.wav"), "label": 2}, {"audio": "wav/b.wav", "label": 10}]
    splits = build(
        data_cfg,
        write_jsonl(tmp_path / "elsewhere/m.jsonl", rows),
        val=str(write_jsonl(clips / "v.jsonl", rows)),
    )
    assert splits.modalities == ("audio",)
    assert splits.class_names == ["2", "10"]  # numbers sort numerically
    assert splits.val[0]["audio"][0].shape == (400,)
    with pytest.raises(DataError, match=r"m\.jsonl row 2: audio file .*wav/b\.wav not found"):
        splits.train[1]


def test_csv_manifest_with_configured_classes(clips, data_cfg):
    (clips / "train.csv").write_text(
        "image,text,label\n"
        "img/a.png,a zero,zero\n"
        'img/b.png,"a, quoted one",1\n'  # integer labels index data.manifest.class_names
        "img/a.png,unlabelled,\n"
    )
    with pytest.raises(DataError, match=r"train\.csv row 4: missing 'label' \(other rows have"):
        build(data_cfg, clips / "train.csv", class_names=["zero", "one", "two"])
    splits = build(
        data_cfg,
        clips / "train.csv",
        class_names=["zero", "one", "two"],
        val=str(clips / "train.csv"),
        unlabelled=True,  # the unlabelled row loads with label None
    )
    assert splits.modalities == ("image", "text") and splits.num_classes == 3
    items = [splits.val[i] for i in range(3)]
    assert [item["label"] for item in items] == [0, 1, None]
    assert items[1]["text"] == "a, quoted one" and items[1]["image"].mode == "RGB"
    assert [item["id"] for item in items] == ["train.csv:2", "train.csv:3", "train.csv:4"]


def test_holdout_when_val_is_missing(clips, data_cfg):
    rows = [row("a", "x", id=f"s{i}") for i in range(20)]
    cfg = data_cfg(
        "manifest", val_fraction=0.25, manifest={"train": str(write_jsonl(clips / "t.jsonl", rows))}
    )
    splits = build_splits(cfg)
    assert (len(splits.train), len(splits.val)) == (15, 5)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([row("a", "x"), '{"image": "img/a.png", oops}'], r"t\.jsonl row 2: invalid JSON"),
        ([row("a", "x"), "[1, 2]"], r"t\.jsonl row 2: is a JSON list, not an object"),
        (
            [row("a", "x"), row("b", "y"), {"image": "img/a.png", "text": "no audio"}],
            r"t\.jsonl row 3: missing 'audio' \(the train manifest's rows have image, audio, "
            r"text\)",
        ),
        ([row("a", "x"), row("b", ["x"])], r"t\.jsonl row 2: label \['x'\] must be a class name"),
        ([row("a", "x"), row("b", "x", id="t.jsonl:1")], r"row 2: id 't\.jsonl:1' repeats row 1"),
        ([row("a", "x"), {**row("b", "x"), "text": 5}], r"row 2: 'text' must be a string"),
    ],
    ids=["bad-json", "not-object", "missing-column", "label-type", "repeated-id", "text-type"],
)
def test_bad_rows_name_file_and_line(clips, data_cfg, rows, message):
    train = write_jsonl(clips / "t.jsonl", rows)
    with pytest.raises(DataError, match=message):
        build(data_cfg, train)
    # under on_error=skip the row becomes a Skipped sample with the same reason
    cfg = data_cfg("manifest", on_error="skip", manifest={"train": str(train), "val": str(train)})
    val = build_splits(cfg).val
    skipped = [val[i] for i in range(len(val)) if isinstance(val[i], Skipped)]
    assert len(skipped) == 1 and re.search(message, skipped[0].reason)


def test_label_outside_class_set(clips, data_cfg):
    train = write_jsonl(clips / "train.jsonl", [row("a", "cat"), row("b", "dog")])
    val = write_jsonl(clips / "val.jsonl", [row("a", "cat"), row("b", "bird")])
    with pytest.raises(
        DataError,
        match=r"val\.jsonl row 2: label 'bird' is not in the class set "
        r"\(2 classes: cat, dog",
    ):
        build(data_cfg, train, val=str(val))
    indexed = write_jsonl(clips / "indexed.jsonl", [row("a", 1), row("b", 7)])
    with pytest.raises(DataError, match=r"indexed\.jsonl row 2: label 7 is not in the class set"):
        build(data_cfg, indexed, class_names=["cat", "dog"])  # 1 is an index, 7 out of range
    assert (
        build(data_cfg, train, class_names=["cat", "dog", "bird"], val=str(val)).val[1]["label"]
        == 2
    )


def test_missing_files_and_skip(clips, data_cfg):
    rows = [row("a", "x"), row("gone", "x"), {**row("a", "x"), "image": "img/b.png"}]
    train = write_jsonl(clips / "t.jsonl", rows)
    (clips / "img/b.png").write_bytes(b"\x89PNG broken")
    splits = build(data_cfg, train, val=str(train))
    assert splits.val[0]["label"] == 0
    with pytest.raises(DataError, match=r"t\.jsonl row 2: image file .*img/gone\.png not found"):
        splits.val[1]
    with pytest.raises(DataError, match=r"t\.jsonl row 3: image file .*b\.png cannot be decoded"):
        splits.val[2]
    cfg = data_cfg("manifest", on_error="skip", manifest={"train": str(train), "val": str(train)})
    val = build_splits(cfg).val
    assert not isinstance(val[0], Skipped)
    assert val[1] == Skipped("t.jsonl:2", val[1].reason) and "gone.png not found" in val[1].reason


def test_manifest_config_errors(clips, data_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.manifest\.train: required"):
        build_splits(data_cfg("manifest"))
    with pytest.raises(ConfigError, match=r"data\.manifest\.train: manifest .*nope\.jsonl not"):
        build(data_cfg, tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"data\.manifest\.train: .*rows\.txt must end in"):
        build(data_cfg, write_jsonl(tmp_path / "rows.txt", [row("a")]))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match=r"data\.manifest\.train: manifest .*empty\.jsonl has no"):
        build(data_cfg, tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("image,label\n")
    with pytest.raises(ConfigError, match=r"header\.csv has no rows"):
        build(data_cfg, tmp_path / "header.csv")
    train = write_jsonl(clips / "t.jsonl", [row("a", "x")])
    with pytest.raises(ConfigError, match=r"data\.manifest\.test: manifest .*missing\.csv not"):
        build(data_cfg, train, test=str(tmp_path / "missing.csv"))
    with pytest.raises(ConfigError, match=r"has no image, audio, text column"):
        build(data_cfg, write_jsonl(tmp_path / "l.jsonl", [{"label": "x"}]))
    with pytest.raises(ConfigError, match=r"data\.manifest\.class_names: has repeated"):
        build(data_cfg, train, class_names=["x", "x"])


def test_csv_row_with_wrong_field_count(clips, data_cfg):
    (clips / "t.csv").write_text("text,label\nhello,a\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"t\.csv row 3: has 3 fields but the header has 2"):
        build(data_cfg, clips / "t.csv")


def test_images_decode_to_arrays(clips, data_cfg):
    splits = build(
        data_cfg,
        write_jsonl(clips / "t.jsonl", [{"image": "img/a.png"}]),
        val=str(clips / "t.jsonl"),
    )
    assert np.asarray(splits.val[0]["image"]).shape == (10, 12)
    assert splits.class_names == [] and splits.val[0]["label"] is None


# --------------------------------------------------------------------------- text tables


def text_cfg(data_cfg, train: Path, on_error: str = "raise", **manifest: Any):
    return data_cfg(
        "manifest", on_error=on_error, manifest={"train": str(train), "val": str(train), **manifest}
    )


def test_tsv_without_header_columns_by_index(data_cfg, tmp_path):
    """AG News as shipped: TEXT<TAB>CLASS, no header; quotes are text in TSV."""
    train = tmp_path / "train.tsv"
    train.write_text('Stocks "rally" again\tBusiness\nA goal, late\tSports\n')
    splits = build_splits(text_cfg(data_cfg, train, header=False, columns={"text": 0, "label": 1}))
    assert splits.modalities == ("text",) and splits.class_names == ["Business", "Sports"]
    assert splits.val[0]["text"] == 'Stocks "rally" again' and splits.val[1]["label"] == 1


def test_csv_columns_by_name_and_other_delimiter(data_cfg, tmp_path):
    """GLUE-style header with other column names, and a ';'-separated file."""
    train = tmp_path / "phrases.txt"
    train.write_text("sentence;score\na fine film;1\ndull;0\n")
    cfg = text_cfg(
        data_cfg,
        train,
        delimiter=";",
        columns={"text": "sentence", "label": "score"},
        class_names=["negative", "positive"],
    )
    splits = build_splits(cfg)
    assert [splits.val[i]["label"] for i in range(2)] == [1, 0]
    assert splits.val[0]["text"] == "a fine film"


@pytest.mark.parametrize(
    ("content", "manifest", "message"),
    [
        ("text,label\nfine,positive\n  ,negative\n", {}, r"train\.csv row 3: empty 'text'"),
        (
            "text,label\nfine,positive\nbad,nope\n",
            {"class_names": ["negative", "positive"]},
            r"train\.csv row 3: label 'nope' is not in the class set",
        ),
        ("text,label\nfine,positive\nbad\n", {}, r"train\.csv row 3: has 1 fields but the header"),
        (
            "fine\tpositive\nbad\n",
            {"header": False, "columns": {"text": 0, "label": 1}},
            r"train\.csv row 2: has 1 fields, missing column\(s\) 0 \(text\), 1 \(label\)",
        ),
        ("text,label\nfine,positive\nbad,\n", {}, r"train\.csv row 3: missing 'label'"),
    ],
    ids=["empty-text", "unknown-label", "short-row", "short-row-no-header", "no-label"],
)
def test_bad_text_rows_named_or_skipped_and_counted(data_cfg, tmp_path, content, manifest, message):
    train = tmp_path / "train.csv"
    train.write_text(content)
    if manifest.get("header") is False:
        manifest = {**manifest, "delimiter": "\t"}
    with pytest.raises(DataError, match=message):
        build_splits(text_cfg(data_cfg, train, **manifest))
    val = build_splits(text_cfg(data_cfg, train, on_error="skip", **manifest)).val
    skipped = [val[i] for i in range(len(val)) if isinstance(val[i], Skipped)]
    assert len(skipped) == 1 and re.search(message.split(": ", 1)[1], skipped[0].reason)
    assert not isinstance(val[0], Skipped) and val[0]["text"] == "fine"


def test_column_settings_checked(data_cfg, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nfine,positive\n")
    with pytest.raises(DataError, match=r"columns\.text: no column 'sentence' in the header"):
        build_splits(text_cfg(data_cfg, train, columns={"text": "sentence"}))
    with pytest.raises(ConfigError, match=r"data\.manifest\.columns\.txt: not a role"):
        build_splits(text_cfg(data_cfg, train, columns={"txt": 0}))
    with pytest.raises(ConfigError, match=r"header=false, so columns are 0-based indices"):
        build_splits(text_cfg(data_cfg, train, header=False, columns={"text": "text"}))
