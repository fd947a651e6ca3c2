"""Issue 14, `mmkd pack` (finding 7): files in sub-folders are packed, a class-sorted source
gives shards that mix the classes, an interrupted pack is refused by training and resumes to the
same shards, and pack numbers classes as the folder dataset does."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

import mmkd.pack as pack_module
from mmkd.cli import main as cli_main
from mmkd.data import build_splits
from mmkd.errors import ConfigError
from mmkd.pack import pack


def shard_labels(folder: Path) -> dict[str, list[str]]:
    """Labels of every shard's samples, by shard file name."""
    return {
        path.name: [
            s["cls"].decode() for s in wds.tariterators.tarfile_samples([{"url": str(path)}])
        ]
        for path in sorted(folder.glob("*.tar"))
    }


def class_folder(media, root: str, classes: list[str], per_class: int, nested: int = 0) -> None:
    """ROOT/<class>/<i>.png, plus `nested` more per class in ROOT/<class>/more/."""
    for name in classes:
        for i in range(per_class):
            media.png(f"{root}/{name}/{i}.png", size=(4, 4), mode="RGB")
        for i in range(nested):
            media.png(f"{root}/{name}/more/{i}.png", size=(4, 4), mode="RGB")


def test_files_in_sub_folders_are_packed(tmp_path, media):
    """250 of 300 packed, silently, before: files in a class folder's sub-folders were left out."""
    class_folder(media, "src", ["a", "b"], per_class=5, nested=1)
    packed = pack(tmp_path / "src", tmp_path / "out", shard_size=4, progress=False)
    assert packed.samples == 12
    keys = {
        s["__key__"]
        for path in (tmp_path / "out").glob("*.tar")
        for s in wds.tariterators.tarfile_samples([{"url": str(path)}])
    }
    assert {"a_more_0", "b_more_0", "a_0"} <= keys


def test_class_sorted_source_gives_shards_that_mix_classes(tmp_path, media):
    """A manifest sorted by class (FSDD's file order) used to give one or two classes per
    shard, which a 1,000-sample shuffle buffer cannot mix."""
    rows = []
    for digit in range(5):
        for i in range(20):
            path = media.wav(f"wav/{digit}_{i}.wav", samples=200)
            rows.append({"id": f"{digit}_{i}", "audio": str(path), "label": str(digit)})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pack(manifest, tmp_path / "out", shard_size=20, progress=False)
    per_shard = shard_labels(tmp_path / "out")
    assert len(per_shard) == 5
    for labels in per_shard.values():
        assert len(set(labels)) >= 4, Counter(labels)  # a sorted pack: 1 class per shard
    # the shuffle is seeded: packing again gives the same shards, byte for byte
    pack(manifest, tmp_path / "again", shard_size=20, progress=False)
    for name in per_shard:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_interrupted_pack_is_refused_by_training_then_resumes_to_the_same_shards(
    tmp_path, media, monkeypatch, data_cfg, capsys
):
    class_folder(media, "src", ["a", "b", "c"], per_class=6)
    pack(tmp_path / "src", tmp_path / "whole", shard_size=4, progress=False)
    real, calls = pack_module.file_entry, {"n": 0}

    def killed_after_nine(modality, path):  # stands for SIGKILL / a full disk mid-pack
        calls["n"] += 1
        if calls["n"] > 9:
            raise KeyboardInterrupt
        return real(modality, path)

    monkeypatch.setattr(pack_module, "file_entry", killed_after_nine)
    with pytest.raises(KeyboardInterrupt):
        pack(tmp_path / "src", tmp_path / "out", shard_size=4, progress=False)
    monkeypatch.setattr(pack_module, "file_entry", real)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["src-000000.tar", "src-000001.tar"]
    assert not (out / "shards.json").exists()  # written last: the pack is not complete
    cfg = data_cfg(
        "webdataset",
        webdataset={
            "train": str(out),
            "val": str(out / "src-000001.tar"),
            "class_names": ["a", "b", "c"],
        },
    )
    with pytest.raises(ConfigError, match=r"unfinished `mmkd pack`.*allow_incomplete"):
        build_splits(cfg)
    cfg.webdataset.allow_incomplete = True
    cfg.webdataset.train = str(out / "src-000000.tar")
    assert len(build_splits(cfg).train) == 4  # told otherwise: the finished shards are read
    # the same command again finishes the pack, keeping the finished shards
    assert cli_main(["pack", str(tmp_path / "src"), str(out), "--shard-size", "4"]) == 0
    assert "2 kept from an interrupted run" in capsys.readouterr().out
    whole = sorted(p.name for p in (tmp_path / "whole").glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == whole
    for name in whole:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    index = json.loads((out / "shards.json").read_text())
    assert index == json.loads((tmp_path / "whole" / "shards.json").read_text())
    assert not list(out.glob("*.packing.json")) and not list(out.glob(".*.tmp"))


def test_pack_numbers_classes_as_the_folder_dataset(tmp_path, media, data_cfg):
    """Pack natural-sorted class names ("9" before "10") where data.name=folder sorts them
    plainly ("10" before "9"): the same folder gave other class indices from shards."""
    class_folder(media, "src", ["9", "10", "b"], per_class=2)
    folder = build_splits(
        data_cfg("folder", folder={"train": str(tmp_path / "src"), "val_size": 1})
    )
    packed = pack(tmp_path / "src", tmp_path / "out", shard_size=10, progress=False)
    assert packed.class_names == folder.class_names == ["10", "9", "b"]
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["class_names"] == folder.class_names


def test_class_folder_without_usable_files_is_refused(tmp_path, media):
    """Finding 9 (pack side): a class with no image / audio file is refused, naming it."""
    class_folder(media, "src", ["a", "b"], per_class=2)
    media.raw("src/c/notes.txt", b"not a sample")
    with pytest.raises(ConfigError, match=r"class folder .*src/c holds no image or audio file"):
        pack(tmp_path / "src", tmp_path / "out", progress=False)


@pytest.mark.slow
def test_sigkilled_pack_command_resumes_to_the_same_shards(tmp_path, media):
    """A real SIGKILL of `mmkd pack` (no cleanup runs): training refuses the folder, and the
    same command again finishes it, leaving the shards of an uninterrupted pack and no debris."""
    import os
    import signal
    import subprocess
    import sys
    import time

    class_folder(media, "src", ["a", "b", "c", "d"], per_class=60)
    pack(tmp_path / "src", tmp_path / "whole", shard_size=8, progress=False)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mmkd.cli", "pack", str(tmp_path / "src"), str(out)]
    command += ["--shard-size", "8"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("src-*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / "src.packing.json").is_file() and not (out / "shards.json").exists()
    assert subprocess.run(command, capture_output=True).returncode == 0
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in out.iterdir()) == whole  # no .tmp, no packing file left
    for name in whole:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
