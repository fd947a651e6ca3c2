"""File decoding (audio, images, IDX) and the file-backed datasets on small synthetic folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from mmkd.data import build_splits
from mmkd.data.base import Skipped
from mmkd.data.decode import read_audio, read_image
from mmkd.data.fsdd import official_split, parse_clip, select_split
from mmkd.data.mnist import read_idx
from mmkd.errors import ConfigError, DataError

# --------------------------------------------------------------------------- audio


def test_read_audio_mono_and_stereo(media):
    wave, rate = read_audio(media.wav("mono.wav", samples=800))
    assert wave.dtype == np.float32 and wave.shape == (800,) and rate == 8000
    assert 0.4 < np.abs(wave).max() <= 0.5 + 1e-3  # PCM scaled to [-1, 1]
    stereo, rate = read_audio(media.wav("stereo.wav", samples=300, channels=2, rate=16000))
    assert stereo.shape == (300, 2) and rate == 16000  # no downmix, no resample here


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_read_audio_rejects_non_finite_float_wav(media, bad):
    wave = np.zeros(100, dtype=np.float32)
    wave[10] = bad
    path = media.wav("nan.wav", wave=wave, subtype="FLOAT")
    with pytest.raises(DataError, match=r"nan\.wav contains NaN or Inf"):
        read_audio(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: m.folder / "absent.wav", r"audio file .*absent\.wav not found"),
        (lambda m: m.raw("empty.wav", b""), r"empty\.wav is empty \(0 bytes\)"),
        (lambda m: m.raw("junk.wav", b"RIFF" + bytes(range(200))), r"junk\.wav cannot be decoded"),
        (lambda m: m.raw("cut.wav", m.wav("full.wav").read_bytes()[:30]), r"cut\.wav cannot be"),
        (lambda m: m.wav("silent.wav", wave=np.zeros(0)), r"silent\.wav has no samples"),
        (lambda m: m.path("folder.wav/x").parent, r"folder\.wav is not a regular file"),
    ],
    ids=["missing", "empty", "corrupt", "truncated", "zero-samples", "directory"],
)
def test_read_audio_errors_name_the_file(media, make, message):
    with pytest.raises(DataError, match=message):
        read_audio(make(media))


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_read_image_is_loaded_and_closed(media, mode):
    path = media.png(f"{mode}.png", size=(12, 10), mode=mode)
    image = read_image(path)
    path.unlink()  # pixels are already in memory
    assert image.mode == mode and image.size == (12, 10)
    assert np.asarray(image).shape[:2] == (10, 12)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: m.folder / "absent.png", r"image file .*absent\.png not found"),
        (lambda m: m.raw("empty.png", b""), r"empty\.png is empty"),
        (lambda m: m.raw("junk.png", b"not an image at all"), r"junk\.png cannot be decoded"),
        (
            lambda m: m.raw(
                "cut.png", m.png("big.png", size=(64, 64), mode="RGB").read_bytes()[:400]
            ),
            r"cut\.png cannot be decoded",
        ),
    ],
    ids=["missing", "empty", "corrupt", "truncated"],
)
def test_read_image_errors_name_the_file(media, make, message):
    with pytest.raises(DataError, match=message):
        read_image(make(media))


# --------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(array)
    path = tmp_path / "a-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if compress else data)
    assert np.array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", r"promises shape \(5,\).*truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02abc", r"holds 3 bytes"),
        (b"\x08\x03\x00\x00rest", r"not an IDX file \(magic number 08030000\)"),
        (b"\x00\x00\x08\x03\x00\x00", r"truncated IDX header"),
        (b"\x1f\x8b\x08\x00garbage", r"cannot be read or decompressed"),
    ],
    ids=["short", "long", "magic", "header", "bad-gzip"],
)
def test_read_idx_errors_name_the_file(tmp_path, data, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"bad-idx1-ubyte: .*{message}"):
        read_idx(path)


# --------------------------------------------------------------------------- FSDD rules


def test_fsdd_name_and_split_rule():
    clip = parse_clip(Path("7_theo_12.wav"))
    assert clip is not None and (clip.digit, clip.speaker, clip.index) == (7, "theo", 12)
    assert parse_clip(Path("notes.txt")) is None and parse_clip(Path("12_theo_1.wav")) is None
    assert [official_split(i) for i in (0, 4, 5, 49)] == ["test", "test", "train", "train"]
    clips = [c for i in range(8) if (c := parse_clip(Path(f"1_a_{i}.wav")))]
    assert [c.index for c in select_split(clips, "test")] == [0, 1, 2, 3, 4]
    assert [c.index for c in select_split(clips, "train")] == [5, 6, 7]
    assert len(select_split(clips, "all")) == 8
    with pytest.raises(ConfigError, match=r"data\.fsdd\.split"):
        select_split(clips, "dev")


# --------------------------------------------------------------------------- synthetic folders

SPEAKERS = ("anna", "bob")


@pytest.fixture
def fake_root(media) -> Path:
    """ROOT/mnist (200 train, 50 test images) and ROOT/fsdd/recordings (2 speakers x 10 x 8)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 50)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        media.raw(f"mnist/{prefix}-images-idx3-ubyte.gz", gzip.compress(idx_bytes(images)))
        media.raw(f"mnist/{prefix}-labels-idx1-ubyte", idx_bytes(np.arange(n) % 10))
    for speaker in SPEAKERS:
        for digit in range(10):
            for index in range(8):
                media.wav(f"fsdd/recordings/{digit}_{speaker}_{index}.wav", samples=80)
    media.raw("fsdd/recordings/README.txt", b"not a clip")
    return media.folder


def test_mnist_builder(fake_root, data_cfg):
    splits = build_splits(
        data_cfg("mnist", root=str(fake_root), val_fraction=0.2, prompt_template="the digit {name}")
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (160, 40, 50)
    assert splits.modalities == ("image", "text") and splits.num_classes == 10
    item = splits.test[13]
    assert item["id"] == "mnist-test-13" and item["label"] == 3
    assert item["image"].shape == (28, 28) and item["image"].dtype == np.uint8
    assert item["text"] == "the digit three"
    whole = build_splits(data_cfg("mnist", root=str(fake_root), mnist={"split": "train"}))
    assert len(whole.test) == 200


def test_mnist_config_errors(fake_root, data_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"data.mnist.root: not set, and data.root"):
        build_splits(data_cfg("mnist"))
    with pytest.raises(ConfigError, match=r"data.mnist.root: folder .*nowhere does not exist"):
        build_splits(data_cfg("mnist", mnist={"root": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match=r"data.mnist.root: .* has no train-images-idx3-ubyte"):
        build_splits(data_cfg("mnist", mnist={"root": str(fake_root / "fsdd")}))
    with pytest.raises(ConfigError, match=r"data.prompt_template"):
        build_splits(data_cfg("mnist", root=str(fake_root), prompt_template="{label}"))


def test_fsdd_builder(fake_root, data_cfg):
    cfg = data_cfg("fsdd", root=str(fake_root), val_fraction=0.25)
    splits = build_splits(cfg)
    assert splits.modalities == ("audio", "text")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 15, 100)
    train_ids = {splits.train.sample_id(i) for i in range(len(splits.train))}
    val_ids = {splits.val.sample_id(i) for i in range(len(splits.val))}
    assert not train_ids & val_ids
    assert all(official_split(int(name[:-4].split("_")[2])) == "train" for name in val_ids)
    item = splits.test[0]
    assert item["id"] == "0_anna_0.wav" and item["label"] == 0 and item["text"] == "zero"
    wave, rate = item["audio"]
    assert wave.shape == (80,) and rate == 8000
    only_bob = build_splits(
        data_cfg("fsdd", root=str(fake_root), fsdd={"speakers": ["bob"], "split": "all"})
    )
    assert len(only_bob.test) == 80
    assert all("_bob_" in only_bob.test.sample_id(i) for i in range(80))


def test_fsdd_errors(fake_root, data_cfg, media):
    recordings = str(fake_root / "fsdd" / "recordings")
    with pytest.raises(
        ConfigError,
        match=r"data.fsdd.speakers: unknown speaker\(s\) carl; "
        r".* has anna, bob",
    ):
        build_splits(data_cfg("fsdd", fsdd={"root": recordings, "speakers": ["anna", "carl"]}))
    with pytest.raises(ConfigError, match=r"data.fsdd.root: .*mnist has no \{digit\}"):
        build_splits(data_cfg("fsdd", fsdd={"root": str(fake_root / "mnist")}))
    # a broken clip names the file, or becomes Skipped under on_error=skip
    media.raw("fsdd/recordings/3_anna_0.wav", b"RIFF....WAVEfmt broken")
    test = build_splits(data_cfg("fsdd", fsdd={"root": recordings})).test
    broken = next(i for i in range(len(test)) if test.sample_id(i) == "3_anna_0.wav")
    with pytest.raises(DataError, match=r"3_anna_0\.wav cannot be decoded"):
        test[broken]
    skipping = build_splits(data_cfg("fsdd", fsdd={"root": recordings}, on_error="skip")).test
    assert isinstance(skipping[broken], Skipped) and skipping[broken].id == "3_anna_0.wav"


def pair_table(dataset) -> list[tuple[str, str]]:
    return [tuple(dataset.sample_id(i).split("+")) for i in range(len(dataset))]


def test_av_digits_builder(fake_root, data_cfg):
    def build(**overrides):
        cfg = data_cfg("av_digits", root=str(fake_root), **{"val_fraction": 0.25, **overrides})
        return build_splits(cfg)

    splits = build()
    assert splits.modalities == ("image", "audio", "text")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 15, 100)
    for dataset in (splits.train, splits.val, splits.test):
        for clip, image_dataset, image in dataset.pairs:
            assert dataset.audio.clips[clip].digit == image_dataset.part.labels[image]
    item = splits.train[0]
    assert set(item) == {"id", "label", "image", "audio", "text"}
    assert item["id"].endswith(f"+mnist-train-{splits.train.pairs[0][2]}")
    assert {s.split("-")[1] for _, s in pair_table(splits.test)} == {"test"}
    train_images = [image for _, image in pair_table(splits.train)]
    assert len(set(train_images)) == len(train_images)  # enough supply: no reuse
    assert pair_table(build().train) == pair_table(splits.train)
    assert pair_table(build(av_digits={"pair_seed": 1}).train) != pair_table(splits.train)
    several = build(av_digits={"images_per_clip": 3})
    assert len(several.train) == 135
    for start in range(0, 135, 3):
        group = pair_table(several.train)[start : start + 3]
        assert len({clip for clip, _ in group}) == 1 and len({img for _, img in group}) == 3
    with pytest.raises(ConfigError, match=r"data\.av_digits\.images_per_clip"):
        build(av_digits={"images_per_clip": 0})
    with pytest.raises(DataError, match=r"no MNIST images of digit \d in the val pool"):
        build(val_fraction=0.1)  # 20 held-out images miss a digit some val clip needs


def test_av_digits_split_all_keeps_sides_apart(fake_root, data_cfg):
    cfg = data_cfg("av_digits", root=str(fake_root), val_fraction=0.25, fsdd={"split": "all"})
    splits = build_splits(cfg)
    for clip, image in pair_table(splits.test):
        side = official_split(int(clip[:-4].split("_")[2]))
        assert image.startswith(f"mnist-{side}-")


def test_unknown_dataset_name(data_cfg):
    with pytest.raises(ConfigError, match=r"data.name: unknown dataset 'mnsit'.*'mnist'"):
        build_splits(data_cfg("mnsit"))
