"""WebDataset shards: split by rank and worker, equal epoch lengths, resume, decoding errors."""

from __future__ import annotations

import io
import os
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from mmkd.data import build_splits
from mmkd.data.datamodule import RoleCollate
from mmkd.data.webdataset import SampleDecoder, ShardStream, StreamLoader, expand_shards
from mmkd.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "eel"]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    folder: Path, sizes: list[int], prefix: str = "train", tag: str = "s"
) -> list[str]:
    """Shards of tiny samples (png + txt + cls); keys (TAG SHARD _ INDEX) name shard and index."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard, size in enumerate(sizes):
        path = folder / f"{prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(size):
                key = f"{tag}{shard}_{i}"
                label = CLASSES[(shard + i) % 3]
                sink.write({"__key__": key, "png": png(shard * 1000 + i), "txt": key, "cls": label})
        urls.append(str(path))
    return urls


def stream_of(urls: list[str], on_error: str = "raise", **kwargs) -> ShardStream:
    from mmkd.data.webdataset import shard_sizes

    return ShardStream(urls, shard_sizes(urls), SampleDecoder(CLASSES, on_error), **kwargs)


def ids_collate(samples):
    return [s["id"] for s in samples]


def epoch_batches(
    stream: ShardStream,
    *,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    batch_size: int = 4,
    epoch: int = 0,
    resume: tuple[int, int] | None = None,
) -> list[list[str]]:
    configured = stream.configured(
        rank=rank, world=world, workers=workers, batch_size=batch_size, shuffle=True, pad=True
    )
    loader = StreamLoader(
        configured,
        epoch_of=lambda: epoch,
        resume=resume,
        num_workers=workers,
        collate_fn=ids_collate,
    )
    batches = list(loader)
    if resume is None:
        assert len(batches) == len(loader)
    return batches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_worker(rank: int, port: int, urls: list[str], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stream = stream_of(urls, seed=3, shuffle_shards=True, shuffle_buffer=5)
        world, me = dist.get_world_size(), dist.get_rank()
        for epoch in (0, 1):
            batches = epoch_batches(stream, rank=me, world=world, workers=2, epoch=epoch)
            gathered: list = [None, None]
            dist.all_gather_object(gathered, batches)
            if rank == 0:
                out[epoch] = gathered
    finally:
        dist.destroy_process_group()


def run_two_ranks(urls: list[str]) -> dict:
    out = mp.Manager().dict()
    mp.spawn(gloo_worker, args=(free_port(), urls, out), nprocs=2, join=True)
    return dict(out)


@pytest.mark.slow
def test_two_gloo_ranks_two_workers_see_every_key_once(tmp_path):
    # uneven shards, 24 samples: a multiple of 2 ranks x 2 workers, so nothing is repeated
    urls = write_shards(tmp_path, [7, 3, 5, 9])
    keys = {f"s{shard}_{i}" for shard, n in enumerate([7, 3, 5, 9]) for i in range(n)}
    result = run_two_ranks(urls)
    orders = []
    for epoch in (0, 1):
        per_rank = result[epoch]
        assert len(per_rank[0]) == len(per_rank[1])  # the same number of batches on each rank
        seen = [key for batches in per_rank for batch in batches for key in batch]
        assert Counter(seen) == Counter(keys), epoch  # every key exactly once across ranks
        orders.append(seen)
    assert orders[0] != orders[1]  # shards and samples are reshuffled each epoch


def test_uneven_total_pads_to_equal_epoch_length_on_every_rank(tmp_path):
    sizes = [7, 3, 5, 6, 1]  # 22 samples over 2 ranks x 2 workers: parts of 6, 2 repeated
    urls = write_shards(tmp_path, sizes)
    stream = stream_of(urls, seed=1, shuffle_shards=True, shuffle_buffer=4)
    per_rank = [epoch_batches(stream, rank=r, world=2, workers=2, batch_size=4) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [4, 4]  # 2 workers x ceil(6 / 4)
    seen = Counter(key for batches in per_rank for batch in batches for key in batch)
    assert len(seen) == 22 and sum(seen.values()) == 24
    assert max(seen.values()) == 2  # the padding repeats only a few samples


def test_resume_continues_with_the_remaining_batches_without_reopening_done_shards(
    tmp_path, monkeypatch
):
    urls = write_shards(tmp_path, [6, 6, 6, 6, 6])
    stream = stream_of(urls, seed=0, shuffle_shards=True, shuffle_buffer=4)
    full = epoch_batches(stream, workers=2, epoch=1)
    assert sum(len(b) for b in full) == 30
    resumed = epoch_batches(stream, workers=2, epoch=1, resume=(1, 5))
    assert resumed == full[5:]  # exactly the batches the interrupted epoch had left
    # in-process reading: count the shards opened after 4 of the 8 batches
    opened: list[str] = []
    original = wds.tariterators.tarfile_samples

    def spy(src, *args, **kwargs):
        opened.extend(item["url"] for item in src)
        return original(iter(src), *args, **kwargs)

    monkeypatch.setattr(wds.tariterators, "tarfile_samples", spy)
    full = epoch_batches(stream, epoch=1)
    opened.clear()
    later = epoch_batches(stream, epoch=1, resume=(1, 6))
    assert later == full[6:]
    left = {key.split("_")[0] for batch in later for key in batch}
    assert {Path(url).name for url in opened} == {f"train-{int(s[1:]):06d}.tar" for s in left}
    assert len(set(opened)) < len(urls)  # finished shards were not read again
    # the first pass after a restart takes its epoch from the resume point (Lightning starts
    # it before restoring its epoch counter); a finished epoch resumes with the next one
    assert epoch_batches(stream, epoch=0, resume=(1, 6)) == full[6:]
    assert epoch_batches(stream, epoch=0, resume=(1, 8)) == epoch_batches(stream, epoch=2)


def test_raw_samples_and_modalities_from_a_folder(tmp_path, data_cfg):
    write_shards(tmp_path / "train", [4, 4, 4])
    write_shards(tmp_path / "test", [3], prefix="test", tag="t")
    cfg = data_cfg(
        "webdataset",
        webdataset={
            "train": str(tmp_path / "train"),
            "test": str(tmp_path / "test" / "test-{000000..000000}.tar"),
            "class_names": CLASSES,
        },
    )
    splits = build_splits(cfg)
    assert splits.modalities == ("image", "text")
    assert splits.class_names == CLASSES
    assert len(splits.train) + len(splits.val) == 12 and len(splits.test) == 3
    sample = next(iter(splits.test))
    assert sample["id"] == "t0_0" and sample["text"] == "t0_0" and sample["label"] == 0
    assert sample["where"].endswith("test-000000.tar sample t0_0")
    assert np.asarray(sample["image"]).shape == (6, 6, 3)


def test_config_errors_name_the_key(tmp_path, data_cfg):
    with pytest.raises(ConfigError, match=r"data\.webdataset\.train: shard .* not found"):
        expand_shards(str(tmp_path / "x-{000..001}.tar"), "data.webdataset.train")
    write_shards(tmp_path, [3])
    cfg = data_cfg("webdataset", webdataset={"train": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"data\.webdataset\.val: not set"):
        build_splits(cfg)


def test_bad_samples_raise_naming_shard_and_key_or_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "good", "png": png(0), "cls": "dog"})
        sink.write({"__key__": "broken", "png": b"not a png", "cls": "dog"})
        sink.write({"__key__": "unknown", "png": png(1), "cls": "yak"})
    with pytest.raises(DataError, match=r"bad-000000\.tar sample broken \(\.png\) cannot be"):
        list(stream_of([str(path)]))
    samples = list(stream_of([str(path)], on_error="skip"))
    collate = RoleCollate({}, train=True, keep_labels=True, num_classes=3, on_error="skip")
    batch = collate(samples)
    assert batch["ids"] == ["good"] and batch["skipped"] == 2
    assert "yak" in samples[2].reason


def test_truncated_shard_is_named_and_its_missing_samples_counted(tmp_path):
    (url,) = write_shards(tmp_path, [5])
    sizes = [5]
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 2])  # cut in the middle
    stream = ShardStream([url], sizes, SampleDecoder(CLASSES, "skip"))
    samples = list(stream)
    assert len(samples) == 5  # the epoch keeps its length: missing samples become Skipped
    lost = [s for s in samples if not isinstance(s, dict)]
    assert lost and all("train-000000.tar" in s.reason for s in lost)
    with pytest.raises(DataError, match=r"shard .*train-000000\.tar"):
        list(ShardStream([url], sizes, SampleDecoder(CLASSES, "raise")))
