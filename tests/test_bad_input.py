"""Bad inputs, the way a user meets them: broken files, rows and values behind a manifest.

Every case gives a `DataError` (or `ConfigError` for a manifest rejected as a whole) whose message
names the file or the manifest row; under `data.on_error=skip` the bad sample is dropped, counted
and logged, and the good ones survive. Fuzz tests check that nothing but these errors ever leaves
the manifest loader, the decoders and the preprocessors.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from tiny import tiny_overrides, tiny_spec

from mmkd.adapters import build_adapter
from mmkd.adapters.base import Preprocessor
from mmkd.data import build_splits
from mmkd.data.datamodule import RoleCollate
from mmkd.data.decode import read_audio, read_image
from mmkd.errors import ConfigError, DataError
from mmkd.train import main

CLASSES = ["zero", "one", "two"]
COLUMNS = ["image", "audio", "text", "label"]
FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def preprocessors() -> dict[str, Preprocessor]:
    """An RGB image model refusing grayscale, an 8 kHz mono audio model that neither resamples
    nor downmixes, and a text model: each reads one column of the manifest."""
    torch.manual_seed(0)
    specs = {
        "student": tiny_spec("image", image__channel_mismatch="error"),
        "extra_students.audio": tiny_spec("audio_cnn", audio__resample=False, audio__downmix=False),
        "extra_students.text": tiny_spec("text"),
    }
    return {role: build_adapter(spec).make_preprocessor() for role, spec in specs.items()}


# --------------------------------------------------------------------------- the case table


def good_row(media, index: int) -> dict[str, Any]:
    media.png("img/good.png", mode="RGB")
    media.wav("wav/good.wav", samples=800)
    return {
        "image": "img/good.png",
        "audio": "wav/good.wav",
        "text": f"sample {index}",
        "label": CLASSES[index % 3],
    }


def nan_wav(media) -> str:
    wave = np.full(400, 0.25, dtype=np.float32)
    wave[100] = np.nan
    media.wav("bad/nan.wav", wave=wave, subtype="FLOAT")
    return "bad/nan.wav"


def inf_tiff(media) -> str:
    pixels = np.full((10, 12), 0.5, dtype=np.float32)
    pixels[3, 4] = np.inf
    Image.fromarray(pixels, mode="F").save(media.path("bad/inf.tiff"))
    return "bad/inf.tiff"


def rel(media, path: Path) -> str:
    """`path` as a manifest names it: relative to the manifest's folder."""
    return path.relative_to(media.folder).as_posix()


def cut_wav(media) -> str:
    return rel(media, media.raw("bad/cut.wav", media.wav("bad/full.wav").read_bytes()[:30]))


def junk(media, name: str) -> str:
    return rel(media, media.raw(name, np.random.default_rng(1).bytes(300)))


DROP = object()  # the row lacks that column


@dataclass(frozen=True)
class Case:
    name: str
    change: Callable[[Any], dict[str, Any]]  # media -> columns of the bad row to replace
    message: str  # regex; {m}: the manifest's file name, {row}: the bad row's line
    at_build: bool = False  # rejected when the dataset is built (on_error=raise)
    csv: bool = False  # also run with a CSV manifest

    def pattern(self, manifest: Path, row: int) -> str:
        return self.message.format(m=re.escape(manifest.name), row=row)


IN_ROW = "{m} row {row}: "  # the dataset names the row, then the file
SAMPLE = r"sample {m}:{row} \(.*{m} row {row}\): "  # the preprocessor's complaint about a row
CASES = [
    Case(
        "truncated-wav",
        lambda m: {"audio": cut_wav(m)},
        IN_ROW + r"audio file \S*bad/cut\.wav cannot be decoded",
    ),
    Case(
        "empty-wav",
        lambda m: {"audio": rel(m, m.raw("bad/empty.wav", b""))},
        IN_ROW + r"audio file \S*bad/empty\.wav is empty \(0 bytes\)",
    ),
    Case(
        "random-bytes-png",
        lambda m: {"image": junk(m, "bad/junk.png")},
        IN_ROW + r"image file \S*bad/junk\.png cannot be decoded",
    ),
    Case(
        "missing-file",
        lambda m: {"audio": "wav/absent.wav"},
        IN_ROW + r"audio file \S*wav/absent\.wav not found",
        csv=True,
    ),
    Case(
        "directory-not-file",
        lambda m: {"image": "img"},
        IN_ROW + r"image file \S*img is not a regular file",
    ),
    Case(
        "16khz-no-resample",
        lambda m: {"audio": rel(m, m.wav("bad/16k.wav", rate=16000, samples=1600))},
        SAMPLE + r"audio is at 16000 Hz; the model expects 8000 Hz \(set audio.resample=true",
    ),
    Case(
        "stereo-no-downmix",
        lambda m: {"audio": rel(m, m.wav("bad/st.wav", channels=2))},
        SAMPLE + r"audio has 2 channels; the model reads mono \(set audio.downmix=true",
        csv=True,
    ),
    Case(
        "grayscale-for-rgb",
        lambda m: {"image": rel(m, m.png("bad/gray.png", mode="L"))},
        SAMPLE + r"image mode L does not match the model's RGB input",
    ),
    Case(
        "rgba-for-rgb",
        lambda m: {"image": rel(m, m.png("bad/rgba.png", mode="RGBA"))},
        SAMPLE + r"image mode RGBA does not match the model's RGB input",
    ),
    Case(
        "blank-text",  # only whitespace: found when the manifest is read
        lambda m: {"text": "  \t "},
        IN_ROW + "empty 'text'",
        at_build=True,
    ),
    Case(
        "empty-text",  # an empty value is a missing one
        lambda m: {"text": ""},
        IN_ROW + r"missing 'text' \(the train manifest's rows have image, audio, text\)",
        at_build=True,
        csv=True,
    ),
    Case(
        "label-not-a-class",
        lambda m: {"label": "seven"},
        IN_ROW + r"label 'seven' is not in the class set \(3 classes: zero, one, two",
        at_build=True,
        csv=True,
    ),
    Case(
        "label-index-out-of-range",
        lambda m: {"label": 3},
        IN_ROW + r"label 3 is not in the class set",
        at_build=True,
    ),
    Case(
        "nan-in-wav",
        lambda m: {"audio": nan_wav(m)},
        IN_ROW + r"audio file \S*bad/nan\.wav contains NaN or Inf",
    ),
    Case(
        "inf-in-float-image",
        lambda m: {"image": inf_tiff(m)},
        SAMPLE + "image contains NaN or Inf",
    ),
    Case(
        "missing-column",
        lambda m: {"audio": DROP},
        IN_ROW + r"missing 'audio' \(the train manifest's rows have image, audio, text\)",
        at_build=True,
        csv=True,
    ),
]
CSV_CASES = [case for case in CASES if case.csv]


def write_manifest(media, case: Case, suffix: str) -> tuple[Path, int, list[str]]:
    """Three good rows with the bad one second: (manifest, bad row's line, good ids)."""
    rows = [good_row(media, i) for i in range(3)]
    bad = {**good_row(media, 9), **case.change(media)}
    rows.insert(1, {k: v for k, v in bad.items() if v is not DROP})
    path = media.path(f"m.{suffix}")
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        first = 1
    else:
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        first = 2  # line 1 is the header
    good_ids = [f"{path.name}:{first + i}" for i in (0, 2, 3)]
    return path, first + 1, good_ids


def manifest_cfg(data_cfg, path: Path, on_error: str, **manifest: Any):
    return data_cfg(
        "manifest",
        on_error=on_error,
        manifest={"train": str(path), "val": str(path), "class_names": CLASSES, **manifest},
    )


def load_batch(cfg, preprocessors: dict[str, Preprocessor]) -> dict[str, Any]:
    """Build the splits, load every training item and collate them as training would."""
    splits = build_splits(cfg)
    collate = RoleCollate(
        preprocessors,
        train=False,
        keep_labels=True,
        num_classes=splits.num_classes,
        on_error=cfg.on_error,
    )
    return collate([splits.train[i] for i in range(len(splits.train))])


def run_case(case: Case, suffix: str, media, data_cfg, preprocessors, caplog) -> None:
    path, line, good_ids = write_manifest(media, case, suffix)
    pattern = case.pattern(path, line)

    if case.at_build:  # the row is refused as soon as the manifest is read
        with pytest.raises(DataError, match=pattern):
            build_splits(manifest_cfg(data_cfg, path, "raise"))
    with pytest.raises(DataError, match=pattern) as raised:
        load_batch(manifest_cfg(data_cfg, path, "raise"), preprocessors)
    assert "Traceback" not in str(raised.value)

    with caplog.at_level(logging.WARNING, logger="mmkd"):
        batch = load_batch(manifest_cfg(data_cfg, path, "skip"), preprocessors)
    assert batch["skipped"] == 1
    assert batch["ids"] == good_ids
    assert batch["labels"].tolist() == [0, 1, 2]
    assert batch["inputs"]["student"]["pixels"].shape[0] == 3
    assert batch["inputs"]["extra_students.audio"]["logmel"].shape[0] == 3
    assert batch["inputs"]["extra_students.text"]["input_ids"].shape[0] == 3
    skipped = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(skipped) == 1 and re.search(pattern, skipped[0]), skipped


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_in_a_jsonl_manifest(case, media, data_cfg, preprocessors, caplog):
    run_case(case, "jsonl", media, data_cfg, preprocessors, caplog)


@pytest.mark.parametrize("case", CSV_CASES, ids=[case.name for case in CSV_CASES])
def test_bad_input_in_a_csv_manifest(case, media, data_cfg, preprocessors, caplog):
    run_case(case, "csv", media, data_cfg, preprocessors, caplog)


def test_a_custom_id_still_names_the_row(media, data_cfg, preprocessors):
    gray = rel(media, media.png("bad/gray7.png", mode="L"))  # found in preprocessing
    rows = [good_row(media, 0), {**good_row(media, 1), "id": "clip-7", "image": gray}]
    path = media.path("ids.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"sample clip-7 \(.*ids\.jsonl row 2\): image mode L"):
        load_batch(manifest_cfg(data_cfg, path, "raise"), preprocessors)


@pytest.mark.parametrize(
    ("write", "manifest", "message"),
    [
        (None, {}, r"data\.manifest\.train: manifest .*absent\.jsonl not found"),
        ("\n\n", {}, r"data\.manifest\.train: manifest .*m\.jsonl has no rows"),
        (
            '{"label": "zero"}\n',
            {},
            r"data\.manifest\.train: .*m\.jsonl has no image, audio, text column with values",
        ),
        (
            '{"text": "hi"}\n',
            {"class_names": ["a", "a"]},
            r"data\.manifest\.class_names: has repeated names",
        ),
    ],
    ids=["manifest-missing", "manifest-empty", "no-modality-column", "repeated-class-names"],
)
def test_a_rejected_manifest_is_a_config_error(media, data_cfg, write, manifest, message):
    path = media.path("m.jsonl" if write is not None else "absent.jsonl")
    if write is not None:
        path.write_text(write)
    for on_error in ("raise", "skip"):  # skipping does not apply to the manifest as a whole
        cfg = data_cfg("manifest", on_error=on_error, manifest={"train": str(path), **manifest})
        with pytest.raises(ConfigError, match=message):
            build_splits(cfg)


# --------------------------------------------------------------------------- a whole run

RUN = [
    *tiny_overrides("student", "audio_cnn"),
    "student.head.classifier=true",
    "teacher=none",
    "distill.cache=false",  # the default experiment caches its teacher; there is none here
    "losses=supervised",
    "data.train_labels=true",
    "data.name=manifest",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "run.latency_seconds=0.02",
]
BAD_FILES = re.compile(r"bad/(cut|empty|junk)\.wav")


@pytest.fixture
def run_manifests(media) -> list[str]:
    """24 good clips + a truncated and an empty wav to train on; 6 good + random bytes to test."""
    rows = []
    for i in range(30):
        media.wav(f"wav/{i}.wav", samples=800, rate=8000, wave=np.sin(np.arange(800) * (i % 3 + 1)))
        rows.append({"audio": f"wav/{i}.wav", "label": CLASSES[i % 3]})
    train = [*rows[:12], {"audio": cut_wav(media), "label": "one"}, *rows[12:24]]
    train.insert(20, {"audio": rel(media, media.raw("bad/empty.wav", b"")), "label": "two"})
    test = [*rows[24:27], {"audio": junk(media, "bad/junk.wav"), "label": "two"}, *rows[27:]]
    paths = {"train": media.path("train.jsonl"), "test": media.path("test.jsonl")}
    for key, content in (("train", train), ("test", test)):
        paths[key].write_text("".join(json.dumps(row) + "\n" for row in content))
    return [f"data.manifest.train={paths['train']}", f"data.manifest.val={paths['test']}"]


def test_a_run_skips_counts_and_logs_bad_files(run_manifests, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mmkd"):
        code = main([*RUN, *run_manifests, "data.on_error=skip", f"run.dir={run_dir}"])
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data/train_skipped_samples"] == 2  # the truncated and the empty wav
    assert metrics["data/val_skipped_samples"] == 1
    assert metrics["data/skipped_samples"] == 1  # the test split (= val) at the end
    assert 0.0 <= metrics["student/accuracy"] <= 1.0
    logged = " ".join(r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage())
    named = {found.group(0) for found in BAD_FILES.finditer(logged)}
    assert named == {"bad/cut.wav", "bad/empty.wav", "bad/junk.wav"}, logged


def test_a_run_stops_on_a_bad_file_with_a_one_line_error(run_manifests, tmp_path, capsys):
    code = main([*RUN, *run_manifests, "data.on_error=raise", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: "), err[-2000:]
    assert BAD_FILES.search(err.splitlines()[0]) and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_model_reading_a_column_the_manifest_lacks_is_refused(media, tmp_path, capsys):
    media.png("img/a.png", mode="RGB")
    path = media.path("images.jsonl")
    path.write_text("".join(json.dumps({"image": "img/a.png", "label": c}) + "\n" for c in CLASSES))
    code = main([*RUN, f"data.manifest.train={path}", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: student.adapter: audio_cnn reads audio"), err


# --------------------------------------------------------------------------- fuzzing


def wav_bytes(rate: int = 8000, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    wave = np.linspace(-0.5, 0.5, 64 * channels, dtype=np.float32).reshape(64, channels)
    sf.write(out, wave, rate, format="WAV", subtype=subtype)
    return out.getvalue()


def image_bytes(fmt: str, mode: str) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (6, 5), color=7 if mode in ("L", "P", "1", "I", "F") else None).save(out, fmt)
    return out.getvalue()


SEEDS = [
    wav_bytes(),
    wav_bytes(16000, 2),
    wav_bytes(subtype="FLOAT"),
    image_bytes("PNG", "RGB"),
    image_bytes("PNG", "L"),
    image_bytes("PNG", "I;16"),
    image_bytes("BMP", "P"),
    image_bytes("TIFF", "F"),
    image_bytes("GIF", "P"),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real wav / image file, cut short and with some bytes overwritten, or arbitrary bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=4))
        data[at : at + len(patch)] = patch
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(data=mutated(), suffix=st.sampled_from([".wav", ".png", ".bmp", ".tiff"]))
def test_fuzz_decoders_raise_only_data_errors(data, suffix, preprocessors, image_pres):
    """Whatever decodes must also be safe to preprocess (audio: no resampling, so that a
    mutated header's odd rate costs nothing)."""
    pres = {"audio": [preprocessors["extra_students.audio"]], "image": image_pres}
    with (
        tempfile.TemporaryDirectory() as folder,
        mock.patch.object(Image, "MAX_IMAGE_PIXELS", 10**6),
    ):
        path = Path(folder) / f"x{suffix}"
        path.write_bytes(data)
        for read, modality in ((read_audio, "audio"), (read_image, "image")):
            try:
                raw = read(path)
            except DataError as err:
                assert path.name in str(err)
                continue
            for pre in pres[modality]:
                with contextlib.suppress(DataError):
                    pre(raw, train=True)


@pytest.fixture(scope="module")
def audio_pre() -> Preprocessor:
    """8 kHz log-mel that resamples and downmixes (the defaults)."""
    return build_adapter(tiny_spec("audio_cnn")).make_preprocessor()


AUDIO_SHAPES = st.one_of(
    st.tuples(st.integers(0, 3000)),  # (samples,)
    st.tuples(st.integers(0, 1000), st.integers(0, 3)),  # (samples, channels)
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
)
DTYPES = st.sampled_from(["float32", "float64", "int16", "int64", "uint8", "bool", "complex64"])
RATES = st.one_of(
    st.sampled_from([8000, 16000, 4000, 22050, 44100, 1, 3, 0, -1, -8000, 10**12, 8001]),
    st.sampled_from([8000.0, 8000.5, float("nan"), float("inf"), None, "8000", True]),
    st.sampled_from([np.int64(16000), np.float32(8000), np.int32(-5)]),
)


@FUZZ
@given(
    array=hnp.arrays(DTYPES, AUDIO_SHAPES)
    | st.lists(st.floats() | st.text(max_size=2), max_size=9),
    rate=RATES,
    train=st.booleans(),
)
def test_fuzz_audio_preprocessor_raises_only_data_errors(audio_pre, array, rate, train):
    try:
        out = audio_pre((array, rate), train=train)
    except DataError:
        return
    assert out.shape == (1, 16, 51) and torch.isfinite(out).all()


PIL_MODES = ["1", "L", "P", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "La", "I;16"]


@pytest.fixture(scope="module")
def image_pres(preprocessors) -> list[Preprocessor]:
    """The tiny RGB image model refusing other modes, and converting them (the default)."""
    return [preprocessors["student"], build_adapter(tiny_spec("image")).make_preprocessor()]


@FUZZ
@given(
    raw=hnp.arrays(
        st.sampled_from(["uint8", "uint8", "float32", "int64", "bool", "uint16", "complex64"]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
    )
    | st.sampled_from(
        [None, "pixels", [[1, 2], [3]], [[None]], *(Image.new(m, (4, 3)) for m in PIL_MODES)]
    ),
    train=st.booleans(),
)
def test_fuzz_image_preprocessor_raises_only_data_errors(image_pres, raw, train):
    for pre in image_pres:
        try:
            out = pre(raw, train=train)
        except DataError:
            continue
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


ODD = st.one_of(  # any JSON value where a manifest expects a string
    st.text(max_size=8),
    st.integers(-5, 5) | st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
FILES = ["good.png", "gray.png", "good.wav", "stereo.wav", "16k.wav", "nan.wav", "missing.wav"]
PATHS = st.sampled_from([*FILES, ".", "/", "a\x00b", "x" * 300, ""])
LABELS = st.sampled_from(["zero", "one", "two", "seven", "1", "-1", "--1", "-0", "²", "٣", "3"])
COLUMN_VALUES = {
    "image": PATHS,
    "audio": PATHS,
    "text": st.sampled_from(["a dog", " ", ""]) | st.text(max_size=6),
    "label": LABELS | st.integers(-2, 4),
    "id": st.sampled_from(["a", "b", "1"]) | st.integers(0, 2),
}


@st.composite
def manifest_row(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible row (the files of `fuzz_folder`), then a few columns dropped or replaced."""
    row = {
        "image": draw(st.sampled_from(["good.png", "good.png", "gray.png"])),
        "audio": draw(st.sampled_from(["good.wav", "good.wav", "stereo.wav", "16k.wav"])),
        "text": "a dog",
        "label": draw(st.sampled_from(["zero", "one", "two", 1])),
    }
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        column = draw(st.sampled_from(list(COLUMN_VALUES)))
        change = draw(st.sampled_from(["drop", "value", "odd"]))
        if change == "drop":
            row.pop(column, None)
        else:
            row[column] = draw(COLUMN_VALUES[column] if change == "value" else ODD)
    return row


JUNK_LINES = st.text(max_size=20) | st.sampled_from(
    ["[1]", '"x"', "[" * 5000, "1" * 5000, '{"a":', "null", '{"image": NaN}']
)
JSON_LINES = st.lists(
    manifest_row().map(json.dumps) | manifest_row().map(json.dumps) | JUNK_LINES,
    min_size=2,
    max_size=8,
).map("\n".join)


@st.composite
def csv_text(draw: st.DrawFn) -> str:
    """A header of known (sometimes repeated or odd) columns, rows of plausible or garbled cells."""
    header = draw(
        st.just(["image", "audio", "text", "label"])
        | st.lists(st.sampled_from([*COLUMN_VALUES, "extra", ""]), min_size=1, max_size=5)
    )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for _ in range(draw(st.integers(1, 6))):
        row = draw(manifest_row())
        cells = [str(row.get(name, "")) for name in header]
        writer.writerow(cells + draw(st.sampled_from([[], [], [], ["extra"]])))
    text = out.getvalue()
    if draw(st.booleans()):  # garble it: quotes, NULs, stray line breaks
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(alphabet=',"\n\r \x00', max_size=3)) + text[at:]
    return text


def fuzz_folder(root: Path) -> None:
    """The files fuzzed manifests name: good ones and bad ones."""
    Image.new("RGB", (6, 5)).save(root / "good.png")
    Image.new("L", (6, 5)).save(root / "gray.png")
    sf.write(root / "good.wav", np.zeros(400, dtype=np.float32), 8000)
    sf.write(root / "stereo.wav", np.zeros((400, 2), dtype=np.float32), 8000)
    sf.write(root / "16k.wav", np.zeros(800, dtype=np.float32), 16000)
    sf.write(root / "nan.wav", np.full(40, np.nan, dtype=np.float32), 8000, subtype="FLOAT")


@FUZZ
@given(
    content=st.one_of(
        *[JSON_LINES.map(lambda t: (".jsonl", t.encode()))] * 2,
        *[csv_text().map(lambda t: (".csv", t.encode()))] * 2,
        st.tuples(st.sampled_from([".jsonl", ".csv"]), st.binary(max_size=60)),
    ),
    class_names=st.sampled_from([None, CLASSES]) | st.lists(LABELS, max_size=3),
    on_error=st.sampled_from(["raise", "skip"]),
)
def test_fuzz_manifest_loader_raises_only_mmkd_errors(
    content, class_names, on_error, data_cfg, preprocessors
):
    """Build, load and collate: only DataError/ConfigError; under skip, every row that is not
    kept is counted."""
    suffix, data = content
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        fuzz_folder(root)
        path = root / f"m{suffix}"
        path.write_bytes(data)
        manifest = {"train": str(path), "class_names": class_names}
        cfg = data_cfg("manifest", on_error=on_error, val_fraction=0.5, manifest=manifest)
        try:
            splits = build_splits(cfg)
        except (ConfigError, DataError) as err:
            assert str(path) in str(err) or str(err).startswith("data.manifest.")
            return
        for dataset in (splits.train, splits.val):
            collate = RoleCollate(
                preprocessors,
                train=True,
                keep_labels=True,
                num_classes=splits.num_classes,
                on_error=on_error,
            )
            items = []
            for i in range(len(dataset)):
                try:
                    items.append(dataset[i])
                except DataError as err:
                    assert on_error == "raise" and path.name in str(err)
            try:
                batch = collate(items)
            except DataError as err:
                assert on_error == "raise" and path.name in str(err)
                continue
            assert batch["skipped"] + len(batch["ids"]) == len(items)  # never silent
