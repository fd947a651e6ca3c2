"""CREPE distillation: audio read as frames, the crepe adapter against torchcrepe, the sigmoid
KD term against numpy, the pitch metrics against a hand-computed case, and a whole train +
`mmkd evaluate` run on frames of a class-folder tree."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from mmkd.adapters import build_adapter
from mmkd.adapters.crepe import CrepePreprocessor, crepe_module
from mmkd.config.schema import AdapterSpec, adapter_schema, data_schema
from mmkd.data import build_splits
from mmkd.data.folder import index_folder
from mmkd.data.frames import FramesDataset
from mmkd.errors import ConfigError
from mmkd.losses import sigmoid_kd_loss
from mmkd.pitch import decode_pitch, pitch_agreement
from mmkd.replay import replay_scope

torchcrepe = pytest.importorskip("torchcrepe")

RATE = 16000


def voiced(seconds: float, f0: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A harmonic tone (five partials) with a little noise: something CREPE calls voiced."""
    t = np.arange(round(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (0.3 * wave + noise).astype(np.float32)


def write_clips(root: Path, lengths: dict[str, tuple[float, int]]) -> Path:
    """ROOT/<class>/<name>.wav clips: name -> (seconds, sample rate)."""
    for index, (name, (seconds, rate)) in enumerate(lengths.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        subtype = "PCM_16" if path.suffix == ".flac" else "FLOAT"
        sf.write(path, voiced(seconds, 110 + 40 * index, rate, index), rate, subtype=subtype)
    return root


def crepe_spec(**crepe) -> AdapterSpec:
    return OmegaConf.merge(
        OmegaConf.structured(adapter_schema("crepe")),
        {"adapter": "crepe", "crepe": crepe, "head": {"classifier": False}},
    )


# --------------------------------------------------------------------------- frames


def test_frames_have_stable_ids_and_the_clips_samples(tmp_path):
    root = write_clips(
        tmp_path, {"a/one.wav": (0.2, RATE), "a/two.wav": (0.05, RATE), "b/three.wav": (0.1, 8000)}
    )
    clips = index_folder(root, "data.folder.train", None, None, "raise")
    frames = FramesDataset(clips, window=1024, hop=512, sample_rate=RATE)
    # 0.2 s = 3200 samples: 1 + (3200 - 1024) // 512 = 5 frames; 0.05 s (800 samples) is
    # shorter than a window: one zero-padded frame; 0.1 s at 8 kHz resampled = 1600: 2 frames
    ids = [frames.sample_id(i) for i in range(len(frames))]
    assert ids == [
        *(f"a/one.wav@{k * 512}" for k in range(5)),
        "a/two.wav@0",
        "b/three.wav@0",
        "b/three.wav@512",
    ]
    assert [frames[i]["id"] for i in range(len(frames))] == ids
    wave, _ = sf.read(root / "a/one.wav", dtype="float32")
    sample = frames[3]
    assert sample["label"] is None and sample["audio"][1] == RATE
    np.testing.assert_array_equal(sample["audio"][0], wave[1536 : 1536 + 1024])
    short = frames[5]["audio"][0]
    assert short.shape == (1024,) and not short[800:].any() and short[:800].any()
    assert frames[7]["audio"][0].shape == (1024,)  # resampled from 8 kHz
    # a second reader over the same files names the same frames
    again = FramesDataset(clips, window=1024, hop=512, sample_rate=RATE)
    assert [again.sample_id(i) for i in range(len(again))] == ids


def test_frames_through_the_data_config_drop_labels_and_accept_any_test_folders(tmp_path):
    write_clips(tmp_path / "train", {"x/a.wav": (0.2, RATE), "y/b.wav": (0.2, RATE)})
    write_clips(tmp_path / "test", {"other/c.wav": (0.1, RATE)})  # a class train never had
    cfg = OmegaConf.merge(
        OmegaConf.structured(data_schema("folder")),
        {
            "name": "folder",
            "folder": {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")},
            "frames": {"window": 1024, "hop": 1024},
        },
    )
    splits = build_splits(cfg)
    assert splits.class_names == [] and splits.modalities == ("audio",)
    assert [splits.test.sample_id(i) for i in range(len(splits.test))] == ["other/c.wav@0"]
    cfg.frames.window = None  # whole clips: the unknown class folder is an error again
    with pytest.raises(ConfigError, match="not train classes"):
        build_splits(cfg)


def test_frame_reader_holds_at_most_cache_clips_and_memory_stays_flat(tmp_path):
    def peak_reading(count: int) -> tuple[int, int]:
        root = write_clips(tmp_path / str(count), {f"s/{i}.wav": (1.0, RATE) for i in range(count)})
        clips = index_folder(root, "train", None, None, "raise")
        tracemalloc.start()
        frames = FramesDataset(clips, window=1024, hop=1024, sample_rate=RATE, cache_clips=2)
        for i in range(len(frames)):
            frames[i]
            assert len(frames._cache) <= 2
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, len(frames)

    small, n_small = peak_reading(4)
    large, n_large = peak_reading(24)
    assert n_large == 6 * n_small
    # 6x the clips (each 64 kB decoded): the peak grows by the per-clip index only
    assert large < small + 100_000, (small, large)


def test_augmentation_replays_bit_for_bit_and_leaves_global_rng_alone():
    pre = CrepePreprocessor(OmegaConf.create({"gain_db": 6.0, "noise": 0.01, "time_shift": 64}))
    assert pre.randomized_in_training
    raw = (voiced(1024 / RATE, 200), RATE)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with replay_scope(7, "clip.wav@512", 1):
        one = pre(raw, train=True)
    with replay_scope(7, "clip.wav@512", 1):
        two = pre(raw, train=True)
    with replay_scope(7, "clip.wav@512", 2):
        other_view = pre(raw, train=True)
    with replay_scope(7, "clip.wav@1024", 1):
        other_frame = pre(raw, train=True)
    assert torch.equal(one, two)
    assert not torch.equal(one, other_view) and not torch.equal(one, other_frame)
    assert torch.equal(torch.random.get_rng_state(), before)
    clean = pre(raw, train=False)
    assert not torch.equal(clean, one)
    # torchcrepe's per-frame normalisation: zero mean, unit (unbiased) std
    assert abs(float(clean.mean())) < 1e-5 and abs(float(clean.std()) - 1) < 1e-5


# --------------------------------------------------------------------------- adapter


def test_crepe_adapter_with_shipped_tiny_weights_reproduces_torchcrepe_predict():
    """Tolerance: probabilities 1e-6 absolute (the same layers, in the same order), decoded
    pitch 1e-4 relative and periodicity 1e-6 absolute."""
    audio = voiced(0.2, 196.0)
    hop = 256
    decode_pitch(torch.zeros(1, 360))  # predict then uses mmkd's seeded bin centres (pitch.py)
    pitch_ref, periodicity_ref = torchcrepe.predict(
        torch.from_numpy(audio)[None],
        RATE,
        hop,
        fmin=50.0,
        fmax=2006.0,
        model="tiny",
        decoder=torchcrepe.decode.weighted_argmax,
        return_periodicity=True,
        pad=False,
    )
    model = build_adapter(crepe_spec(model="tiny", pretrained=True)).eval()
    pre = model.make_preprocessor()
    starts = range(0, len(audio) - 1024 + 1, hop)
    batch = pre.collate([pre((audio[s : s + 1024], RATE), train=False) for s in starts])
    with torch.no_grad():
        logits = model(batch).logits
        probabilities = torchcrepe.infer(batch["frames"], "tiny")
    assert logits.shape == (len(starts), 360) == (pitch_ref.shape[1], 360)
    torch.testing.assert_close(torch.sigmoid(logits), probabilities, atol=1e-6, rtol=0)
    pitch, periodicity = model.decode(logits)
    torch.testing.assert_close(pitch, pitch_ref[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(periodicity, periodicity_ref[0], atol=1e-6, rtol=0)
    # and it hears the tone: 196 Hz within 50 cents on confident frames
    confident = periodicity > 0.5
    assert confident.sum() >= len(starts) // 2
    cents = 1200 * torch.log2(pitch[confident] / 196.0)
    assert cents.abs().max() < 50


@pytest.mark.parametrize(
    ("name", "conv1", "features"), [("small", 256, 512), ("medium", 512, 1024)]
)
def test_every_capacity_is_torchcrepes_module_resized(name, conv1, features):
    model = build_adapter(crepe_spec(model=name))
    assert isinstance(model.encoder, torchcrepe.Crepe)
    assert model.encoder.conv1.out_channels == conv1 and model.feature_dim == features
    out = model.eval()({"frames": torch.randn(3, 1024)})
    assert out.logits.shape == (3, 360) and out.embedding.shape == (3, features)
    tiny = crepe_module(4)
    assert sum(p.numel() for p in tiny.parameters()) == 486_552  # the paper's tiny: 0.49M
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_pretrained_needs_a_shipped_size():
    from mmkd.adapters.crepe_config import CrepeCfg

    with pytest.raises(ConfigError, match="full and tiny only"):
        CrepeCfg.check(
            OmegaConf.structured(CrepeCfg(model="medium", pretrained=True)), "teacher.crepe"
        )


# --------------------------------------------------------------------------- loss and metrics


def test_sigmoid_kd_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 3, (5, 7)), rng.normal(0, 3, (5, 7))
    w = rng.uniform(0, 2, 7)
    temperature = 2.0

    def reference(s, t, w):
        with np.errstate(over="ignore"):  # exp(1e30) = inf: a target of exactly 0
            p = 1 / (1 + np.exp(-t / temperature))
        q = 1 / (1 + np.exp(-s / temperature))
        bce = -(p * np.log(q) + (1 - p) * np.log(1 - q))
        return float((bce * w).mean() * temperature**2)

    got = sigmoid_kd_loss(torch.tensor(s), torch.tensor(t), temperature, torch.tensor(w))
    assert float(got) == pytest.approx(reference(s, t, w), rel=1e-5)
    plain = sigmoid_kd_loss(torch.tensor(s), torch.tensor(t))
    temperature = 1.0
    assert float(plain) == pytest.approx(reference(s, t, np.ones(7)), rel=1e-5)
    # a class a top-k store left out (-inf logit) is a target of 0, and the loss stays finite
    t_topk = torch.tensor(t).clone()
    t_topk[:, 3] = float("-inf")
    expected = reference(s, np.where(np.arange(7) == 3, -1e30, t), np.ones(7))
    assert float(sigmoid_kd_loss(torch.tensor(s), t_topk)) == pytest.approx(expected, rel=1e-5)
    # the student's gradient vanishes where it matches the teacher
    same = torch.tensor(t, requires_grad=True)
    sigmoid_kd_loss(same, torch.tensor(t)).backward()
    assert same.grad.abs().max() < 1e-7


def test_pitch_metrics_match_a_hand_computed_case():
    teacher = torch.tensor([100.0, 200.0, 300.0, 400.0, 100.0, 250.0])
    t_period = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.1, 0.2])  # first four voiced (>= 0.5)
    # +34 cents (hit), octave up (chroma hit only), -316 cents (miss), -49 cents (hit),
    # then two frames the teacher calls unvoiced (not scored for pitch)
    student = torch.tensor([102.0, 400.0, 250.0, 400 * 2 ** (-49 / 1200), 500.0, 250.0])
    s_period = torch.tensor([0.6, 0.9, 0.2, 0.55, 0.7, 0.1])
    got = pitch_agreement(student, teacher, s_period, t_period, threshold=0.5)
    assert got["raw_pitch_accuracy"] == pytest.approx(2 / 4)
    assert got["raw_chroma_accuracy"] == pytest.approx(3 / 4)
    # voicing: agree, agree, disagree, agree, disagree, agree
    assert got["voicing_agreement"] == pytest.approx(4 / 6)
    assert got["teacher_voiced_frames"] == 4
    silent = pitch_agreement(student, teacher, s_period, torch.zeros(6), 0.5)
    assert math.isnan(silent["raw_pitch_accuracy"])


def test_decode_pitch_reads_a_bin_of_known_frequency():
    logits = torch.full((2, 360), -40.0)
    cents = 20 * torch.tensor([150.0, 250.0]) + 1997.3794084376191  # CREPE's bin centres
    logits[0, 150] = logits[1, 250] = 5.0
    pitch, periodicity = decode_pitch(logits)
    # torchcrepe's weighted_argmax averages the 9 bins around the peak with sigmoid(p) weights
    # over dithered bin centres (+-10 cents, seeded): within 20 cents of the peak bin
    error = 1200 * torch.log2(pitch / (10 * 2 ** (cents / 1200)))
    assert error.abs().max() < 20, error
    # the same in every process: the dither is drawn from a fixed seed
    assert torch.equal(decode_pitch(logits)[0], pitch)
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    from mmkd import pitch as pitch_module

    pitch_module._CENTRES = None
    again, _ = decode_pitch(logits)
    assert torch.equal(again, pitch)
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's stream left alone
    torch.testing.assert_close(periodicity, torch.sigmoid(torch.tensor([5.0, 5.0])))


# --------------------------------------------------------------------------- end to end


def test_train_and_evaluate_on_frames_of_class_folders(tmp_path, capsys):
    from mmkd.evaluate import main as evaluate_main
    from mmkd.train import main as train_main

    write_clips(tmp_path / "train", {"spk/a.wav": (0.3, RATE), "spk/b.wav": (0.3, 8000)})
    write_clips(tmp_path / "val", {"spk/c.wav": (0.15, RATE)})
    write_clips(tmp_path / "other", {"u/d.flac": (0.2, RATE), "v/e.wav": (0.2, RATE)})
    run_dir = tmp_path / "run"
    small = ["crepe.capacity=1"]
    code = train_main(
        [
            "experiment=crepe_kd",
            f"data.folder.train={tmp_path / 'train'}",
            f"data.folder.val={tmp_path / 'val'}",
            "data.frames.hop=512",
            "data.batch_size=8",
            *(f"teacher.{o}" for o in [*small, "crepe.pretrained=false", "crepe.model=tiny"]),
            *(f"student.{o}" for o in small),
            "distill.store.logits_topk=20",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "run.latency_seconds=0.01",
            f"run.dir={run_dir}",
        ]
    )
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("raw_pitch_accuracy", "raw_chroma_accuracy", "voicing_agreement"):
        assert f"student/{key}" in metrics
    assert "student/teacher_agreement" not in metrics  # argmax of sigmoids: skipped
    assert "student/accuracy" not in metrics  # frames carry no labels
    capsys.readouterr()
    assert evaluate_main([str(run_dir), f"data.folder.test={tmp_path / 'other'}"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= evaluated["student/voicing_agreement"] <= 1
    assert evaluated["student/teacher_voiced_frames"] >= 0
    assert set(evaluated) >= {"student/raw_pitch_accuracy", "student/raw_chroma_accuracy"}
