"""`mmkd pack`: manifests and class folders become shards that read back as the same samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmkd.cli import main as cli_main
from mmkd.data import build_splits
from mmkd.errors import DataError
from mmkd.pack import pack


def samples_of(splits_part) -> dict[str, dict]:
    return {s["id"]: s for s in splits_part}


def test_manifest_round_trip_keeps_samples_and_labels(tmp_path, media, data_cfg):
    rows = []
    for i in range(7):
        media.png(f"img/{i}.png", size=(5 + i, 4), mode="RGB")
        media.wav(f"wav/{i}.wav", samples=400 + i)
        files = {"image": f"img/{i}.png", "audio": f"wav/{i}.wav"}
        rows.append({"id": f"row.{i}", **files, "text": f"caption {i}", "label": "ba"[i % 2]})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["pack", str(manifest), str(tmp_path / "shards"), "--shard-size", "3"]) == 0
    tars = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    assert tars == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list((tmp_path / "shards").glob(".*tmp"))

    both = {"train": str(manifest), "val": str(manifest)}
    original = build_splits(data_cfg("manifest", manifest=both))
    shards = {"train": str(tmp_path / "shards"), "val": str(tmp_path / "shards")}
    packed = build_splits(data_cfg("webdataset", webdataset=shards))
    assert packed.class_names == original.class_names == ["a", "b"]
    assert packed.modalities == original.modalities == ("image", "audio", "text")
    before = samples_of(original.val)
    after = samples_of(packed.test)
    assert set(after) == {f"row_{i}" for i in range(7)}  # '.' is reserved in shard keys
    for i in range(7):
        a, b = before[f"row.{i}"], after[f"row_{i}"]
        assert a["label"] == b["label"] and a["text"] == b["text"]
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        np.testing.assert_array_equal(a["audio"][0], b["audio"][0])
        assert a["audio"][1] == b["audio"][1]


def test_class_folder_round_trip_and_index(tmp_path, media, data_cfg):
    for name in ("zebra", "ant"):
        for i in range(3):
            media.png(f"src/{name}/{i}.png", size=(4, 4), mode="RGB")
    media.png("src/ant/pic.bmp.png", size=(4, 4), mode="RGB")  # dots in names are reserved
    packed = pack(tmp_path / "src", tmp_path / "out", shard_size=5, progress=False)
    assert packed.class_names == ["ant", "zebra"] and packed.samples == 7
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["class_names"] == ["ant", "zebra"]
    assert [v["samples"] for v in index["shards"].values()] == [5, 2]
    shards = {"train": str(tmp_path / "out"), "val": str(tmp_path / "out")}
    splits = build_splits(data_cfg("webdataset", webdataset=shards))
    labels = {s["id"]: s["label"] for s in splits.test}
    ants = {"ant_0": 0, "ant_1": 0, "ant_2": 0, "ant_pic_bmp": 0}
    assert labels == {**ants, "zebra_0": 1, "zebra_1": 1, "zebra_2": 1}


def test_bad_samples_are_named_or_skipped_and_counted(tmp_path, media, capsys):
    for i in range(4):
        media.png(f"src/cat/{i}.png", size=(4, 4), mode="RGB")
    media.raw("src/cat/9.png", b"broken")
    with pytest.raises(DataError, match=r"src/cat/9\.png cannot be decoded"):
        pack(tmp_path / "src", tmp_path / "out", shard_size=2, progress=False)
    # the shards finished before the failure stay, no half-written shard is left, and the pack
    # is marked unfinished (no shards.json: that is written last)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "src.packing.json" in left and "shards.json" not in left
    assert all(name.endswith(".tar") for name in left if name != "src.packing.json")
    code = cli_main(["pack", str(tmp_path / "src"), str(tmp_path / "out2"), "--on-error", "skip"])
    assert code == 0
    out = capsys.readouterr().out
    assert "packed 4 samples into 1 shard(s)" in out and "(1 skipped" in out
    refused = cli_main(["pack", str(tmp_path / "src"), str(tmp_path / "out2")])
    assert refused == 2 and "already holds src-*.tar a finished pack" in capsys.readouterr().err
