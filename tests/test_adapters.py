"""Every registered adapter on real files: preprocessing, collate, forward, head options,
freezing, registry errors, config errors, pickling, export spec and weights files."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from PIL import Image
from tiny import TINY_SPECS, tiny_spec

from mmkd.adapters import ADAPTERS, Adapter, build_adapter
from mmkd.adapters.sections import adapter_sections, section_names
from mmkd.errors import CheckpointError, ConfigError, DataError
from mmkd.export import SPEC, WEIGHTS, load_export_spec
from mmkd.io import save_state
from mmkd.registry import Registry, UnknownNameError

NAMES = list(TINY_SPECS)
AUDIO = [n for n in NAMES if n.startswith("audio_")]
LOGMEL = ["audio_cnn", "audio_timm"]
WAVEFORM = ["audio_wav2vec2", "audio_hubert"]
TIMM = ["image", "audio_timm"]

MODEL_RATE = 8000  # tests/tiny.py: TINY_AUDIO
CLIP = 4000  # 0.5 s at 8 kHz
FILE_RATE = 16000
TEXTS = ["a red square", "a small blue circle next to a large green triangle on white paper"]


def build(name: str, seed: int = 0, **overrides: Any) -> Adapter:
    torch.manual_seed(seed)
    return build_adapter(tiny_spec(name, **overrides)).eval()


@pytest.fixture(scope="module")
def built() -> dict[str, Adapter]:
    """One tiny adapter of each kind for the whole module (tests must not change them)."""
    return {name: build(name) for name in NAMES}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    paths = {
        "gray": folder / "gray.png",
        "rgb": folder / "rgb.png",
        "tone16k": folder / "tone16k.wav",
        "stereo": folder / "stereo.wav",
    }
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), mode="L").save(paths["gray"])
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), mode="RGB").save(
        paths["rgb"]
    )
    n = np.arange(FILE_RATE // 4)  # 0.25 s at 16 kHz
    sf.write(
        paths["tone16k"], 0.5 * np.sin(2 * np.pi * 440 * n / FILE_RATE), FILE_RATE, subtype="PCM_16"
    )
    m = np.arange(6000)  # 0.75 s at the model's rate, two different channels
    stereo = np.stack(
        [0.6 * np.sin(2 * np.pi * 300 * m / MODEL_RATE), 0.3 * rng.uniform(-1, 1, m.size)], axis=1
    )
    sf.write(paths["stereo"], stereo, MODEL_RATE, subtype="PCM_16")
    return paths


def raw_samples(name: str, files: dict[str, Path]) -> list[Any]:
    """Two raw samples of the adapter's modality, read back from the files."""
    if name == "image":
        return [Image.open(files["gray"]), Image.open(files["rgb"])]
    if name.startswith("text"):
        return list(TEXTS)
    return [sf.read(files["tone16k"]), sf.read(files["stereo"])]


def run(adapter: Adapter, raws: list[Any], train: bool = False) -> tuple[dict, Any]:
    pre = adapter.make_preprocessor()
    batch = pre.collate([pre(raw, train=train) for raw in raws])
    with torch.no_grad():
        return batch, adapter(batch)


# --------------------------------------------------------------------------- every adapter


def test_every_built_in_adapter_has_a_tiny_spec() -> None:
    built_in = {n for n in ADAPTERS if ADAPTERS.get(n).__module__.startswith("mmkd.adapters.")}
    # crepe has CREPE's fixed outputs (360 pitch bins, no projection head): tests/test_crepe.py
    assert built_in - {"crepe"} == set(TINY_SPECS)


@pytest.mark.parametrize("name", NAMES)
def test_forward_on_real_files(name: str, built: dict[str, Adapter], files: dict) -> None:
    adapter = built[name]
    batch, out = run(adapter, raw_samples(name, files))
    assert adapter.embed_dim == 16 and adapter.num_classes == 3
    assert out.embedding.shape == (2, 16) and out.embedding.dtype == torch.float32
    assert torch.allclose(out.embedding.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out.features.shape == (2, adapter.feature_dim)
    assert out.logits is not None
    assert out.logits.shape == (2, 3) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert not torch.allclose(out.embedding[0], out.embedding[1], atol=1e-4)
    # example_batch has the keys, shapes and dtypes of a real batch (bar text length)
    example = adapter.example_batch(2)
    assert set(example) <= set(batch)
    for key, value in example.items():
        assert value.dtype == batch[key].dtype
        if not name.startswith("text"):
            assert value.shape == batch[key].shape


@pytest.mark.parametrize("name", LOGMEL)
def test_spectrogram_shape(name: str, built: dict[str, Adapter], files: dict) -> None:
    batch, _ = run(built[name], raw_samples(name, files))
    cfg = built[name].spec.audio
    frames = CLIP // cfg.hop_length + 1
    assert batch["logmel"].shape == (2, 1, cfg.n_mels, frames) == (2, 1, 16, 51)
    # each clip's log-mel is standardised
    for clip in batch["logmel"]:
        assert abs(clip.mean().item()) < 1e-4 and abs(clip.std().item() - 1) < 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_no_classifier(name: str, files: dict) -> None:
    adapter = build(name, head__classifier=False)
    assert adapter.head.classifier is None and adapter.num_classes is None
    _, out = run(adapter, raw_samples(name, files))
    assert out.logits is None and out.embedding.shape == (2, 16)


@pytest.mark.parametrize("name", NAMES)
def test_identity_projection_without_embed_dim(name: str, files: dict) -> None:
    adapter = build(name, head__embed_dim=None)
    assert isinstance(adapter.head.proj, torch.nn.Identity)
    assert adapter.embed_dim == adapter.feature_dim
    _, out = run(adapter, raw_samples(name, files))
    assert out.embedding.shape == (2, adapter.feature_dim)
    assert torch.allclose(out.embedding, torch.nn.functional.normalize(out.features, dim=-1))


@pytest.mark.parametrize("name", NAMES)
def test_freeze_encoder(name: str, files: dict) -> None:
    adapter = build(name, freeze_encoder=True, head__hidden_dim=8, head__dropout=0.5)
    assert adapter.encoder_frozen
    assert all(not p.requires_grad for p in adapter.encoder.parameters())
    assert all(p.requires_grad for p in adapter.head.parameters())
    adapter.train()
    assert not any(m.training for m in adapter.encoder.modules())
    assert all(m.training for m in adapter.head.modules()) and adapter.training
    pre = adapter.make_preprocessor()
    batch = pre.collate([pre(raw, train=False) for raw in raw_samples(name, files)])
    buffers = {k: v.clone() for k, v in adapter.encoder.state_dict().items()}
    first, second = adapter(batch), adapter(batch)
    # the encoder is deterministic in train mode (no dropout, layer drop or batch statistics)
    assert torch.equal(first.features, second.features)
    for key, value in adapter.encoder.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    # the head still trains: dropout active, gradients reach it and only it
    assert not torch.equal(first.embedding, second.embedding)
    first.embedding.sum().backward()
    assert all(p.grad is None for p in adapter.encoder.parameters())
    assert adapter.head.proj[0].weight.grad is not None
    adapter.eval()
    assert not adapter.head.training


@pytest.mark.parametrize("name", NAMES)
def test_preprocessor_is_picklable(name: str, built: dict[str, Adapter], files: dict) -> None:
    pre = built[name].make_preprocessor()
    copy = pickle.loads(pickle.dumps(pre))
    assert copy.identity() == pre.identity()
    items = [pre(raw, train=False) for raw in raw_samples(name, files)]
    again = [copy(raw, train=False) for raw in raw_samples(name, files)]
    a, b = pre.collate(items), copy.collate(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# the sections each built-in adapter reads; an export writes these (and the common fields) only
READS = {
    "image": {"timm", "image"},
    "text": {"text"},
    "text_rnn": {"text_rnn"},
    "audio_cnn": {"audio", "cnn"},
    "audio_timm": {"audio", "timm"},
    "audio_wav2vec2": {"audio", "wav2vec2"},
    "audio_hubert": {"audio", "wav2vec2"},
}
SECTIONS = set(section_names())  # every registered adapter section


@pytest.mark.parametrize("name", NAMES)
def test_export_spec_switches_pretrained_sources_off(name: str, tmp_path: Path) -> None:
    adapter = build(name)
    spec = adapter.spec
    spec.weights = "somewhere.safetensors"
    switches = [
        ("timm", "pretrained", True),
        ("timm", "pretrained_file", "backbone.pth"),
        ("text", "pretrained", True),
        ("wav2vec2", "weights_file", "w2v.safetensors"),
    ]
    switches = [(s, f, v) for s, f, v in switches if s in READS[name]]  # the spec's sections
    for section, field, value in switches:
        setattr(getattr(spec, section), field, value)
    exported = adapter.export_spec(tmp_path)
    assert exported.weights is None
    # only the sections the adapter reads (all its spec holds), plus every common field
    assert set(exported) & SECTIONS == READS[name] == set(adapter_sections(name))
    assert set(exported) - SECTIONS == {"adapter", "weights", "freeze_encoder", "features", "head"}
    if "timm" in READS[name]:
        assert exported.timm.pretrained is False and exported.timm.pretrained_file is None
        assert exported.timm.model == spec.timm.model  # the rest of the section is kept
    if "text" in READS[name]:
        assert exported.text.pretrained is False
    if "wav2vec2" in READS[name]:
        assert exported.wav2vec2.weights_file is None
        assert exported.wav2vec2.overrides == spec.wav2vec2.overrides
    # the adapter's own spec is left alone
    assert spec.weights == "somewhere.safetensors"
    for section, field, value in switches:
        assert getattr(getattr(spec, section), field) == value
    assert OmegaConf.to_yaml(exported)  # plain values only: interpolations are resolved
    if name == "text":
        assert exported.text.model == "text" and (tmp_path / "text" / "config.json").is_file()
        assert exported.text.config_overrides == {}


@pytest.mark.parametrize("name", NAMES)
def test_export_folder_rebuilds_the_same_model(name: str, tmp_path: Path, files: dict) -> None:
    adapter = build(name)
    spec = adapter.export_spec(tmp_path)
    OmegaConf.save(spec, tmp_path / SPEC)
    save_state(tmp_path / WEIGHTS, adapter.state_dict())
    loaded_spec = load_export_spec(tmp_path)
    loaded_spec.weights = str(tmp_path)
    torch.manual_seed(1)
    loaded = build_adapter(loaded_spec).eval()
    _, a = run(adapter, raw_samples(name, files))
    _, b = run(loaded, raw_samples(name, files))
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("name", NAMES)
def test_weights_file(name: str, tmp_path: Path, files: dict) -> None:
    source = build(name, seed=0)
    path = tmp_path / "x.safetensors"
    save_state(path, source.state_dict())
    other = build(name, seed=1)
    loaded = build(name, seed=1, weights=str(path))
    raws = raw_samples(name, files)
    _, want = run(source, raws)
    _, fresh = run(other, raws)
    _, got = run(loaded, raws)
    assert not torch.allclose(fresh.embedding, want.embedding)  # a different init differs
    assert torch.equal(got.embedding, want.embedding)
    assert torch.equal(got.features, want.features) and torch.equal(got.logits, want.logits)


def test_weights_file_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_state(path, build("audio_cnn").state_dict())
    with pytest.raises(CheckpointError, match=r"student\.weights") as err:
        build_adapter(tiny_spec("image", weights=str(path)))
    assert "image" in str(err.value) and "missing" in str(err.value)
    # the same key names with other shapes (another class count, another width)
    for overrides in ({"head__num_classes": 5}, {"cnn__channels": [8, 32]}):
        with pytest.raises(CheckpointError, match=r"teacher\.weights: .*size mismatch"):
            build_adapter(tiny_spec("audio_cnn", weights=str(path), **overrides), key="teacher")
    with pytest.raises(CheckpointError, match="no such weights file"):
        build_adapter(tiny_spec("audio_cnn", weights=str(tmp_path / "missing.safetensors")))


# --------------------------------------------------------------------------- registry


def test_unknown_adapter_name() -> None:
    with pytest.raises(UnknownNameError) as err:
        build_adapter(tiny_spec("image", adapter="imagee"), key="teacher")
    message = str(err.value)
    assert message.startswith("teacher.adapter: ")
    assert "'imagee'" in message and "Did you mean 'image'" in message
    for name in NAMES:
        assert name in message
    assert isinstance(err.value, ConfigError) and isinstance(err.value, KeyError)


def test_duplicate_registration_raises() -> None:
    image_cls = ADAPTERS.get("image")
    with pytest.raises(ValueError, match="already registered"):
        ADAPTERS.register("image")(type("Other", (), {}))
    assert ADAPTERS.get("image") is image_cls
    registry: Registry[int] = Registry("thing")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="thing 'a'"):
        registry.register("a")(2)
    assert registry.get("a") == 1 and list(registry) == ["a"] and "a" in registry


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("name", TIMM)
def test_timm_unknown_model(name: str) -> None:
    with pytest.raises(ConfigError, match=r"student\.timm\.model: .*'resnet10q'") as err:
        build_adapter(tiny_spec(name, timm__model="resnet10q"))
    assert "resnet10t" in str(err.value)  # close names are suggested


@pytest.mark.parametrize("name", TIMM)
def test_timm_bad_kwargs(name: str) -> None:
    with pytest.raises(ConfigError, match=r"student\.timm\.kwargs: .*no_such_option"):
        build_adapter(tiny_spec(name, timm__kwargs={"no_such_option": 1}))


def test_text_unknown_config_override() -> None:
    with pytest.raises(ConfigError, match=r"student\.text\.config_overrides: .*hiden_size"):
        build_adapter(tiny_spec("text", text__config_overrides={"hiden_size": 8}))


@pytest.mark.parametrize("name", WAVEFORM)
def test_wav2vec2_unknown_override(name: str) -> None:
    with pytest.raises(ConfigError, match=r"student\.wav2vec2\.overrides: .*encoder_num_layerz"):
        build_adapter(tiny_spec(name, wav2vec2__overrides={"encoder_num_layerz": 1}))


def test_wav2vec2_weights_file(tmp_path: Path, built: dict[str, Adapter], files: dict) -> None:
    source = built["audio_wav2vec2"]
    path = tmp_path / "encoder.safetensors"
    save_state(path, source.encoder.state_dict())
    loaded = build("audio_wav2vec2", seed=1, wav2vec2__weights_file=str(path))
    _, want = run(source, raw_samples("audio_wav2vec2", files))
    _, got = run(loaded, raw_samples("audio_wav2vec2", files))
    assert torch.equal(got.features, want.features)
    save_state(path, built["audio_cnn"].state_dict())
    with pytest.raises(CheckpointError, match=r"student\.wav2vec2\.weights_file"):
        build("audio_wav2vec2", wav2vec2__weights_file=str(path))


def test_image_in_chans_must_be_1_or_3() -> None:
    with pytest.raises(ConfigError, match=r"student\.image\.in_chans"):
        build_adapter(tiny_spec("image", image__in_chans=2))


# --------------------------------------------------------------------------- image


def denormalise(pixels: torch.Tensor, settings: dict) -> torch.Tensor:
    mean = torch.tensor(settings["data_config"]["mean"]).view(-1, 1, 1)
    std = torch.tensor(settings["data_config"]["std"]).view(-1, 1, 1)
    return pixels * std + mean


def test_image_grayscale_file_converted_to_rgb(built: dict[str, Adapter], files: dict) -> None:
    pre = built["image"].make_preprocessor()
    gray = Image.open(files["gray"])
    assert gray.mode == "L" and gray.size == (48, 40)
    item = pre(gray, train=False)
    assert item.shape == (3, 32, 32) and item.dtype == torch.uint8  # normalised by collate
    pixels = pre.collate([item])["pixels"][0]
    assert pixels.dtype == torch.float32
    restored = denormalise(pixels, pre.settings)
    assert torch.allclose(restored[0], restored[1], atol=1e-5)
    assert torch.allclose(restored[1], restored[2], atol=1e-5)
    rgb_item = pre(Image.open(files["rgb"]), train=False)
    rgb = denormalise(pre.collate([rgb_item])["pixels"][0], pre.settings)
    assert not torch.allclose(rgb[0], rgb[1], atol=1e-2)
    assert restored.min() >= 0 and restored.max() <= 1 + 1e-5


def test_image_rgb_file_into_one_channel_model(files: dict) -> None:
    adapter = build("image", image__in_chans=1)
    pre = adapter.make_preprocessor()
    assert len(pre.settings["data_config"]["mean"]) == 1
    batch, out = run(adapter, raw_samples("image", files))
    assert batch["pixels"].shape == (2, 1, 32, 32)
    assert out.embedding.shape == (2, 16)


def test_image_channel_mismatch_error(files: dict) -> None:
    rgb_model = build("image", image__channel_mismatch="error").make_preprocessor()
    with pytest.raises(DataError, match="image mode L"):
        rgb_model(Image.open(files["gray"]), train=False)
    assert rgb_model(Image.open(files["rgb"]), train=False).shape == (3, 32, 32)
    gray_model = build("image", image__in_chans=1, image__channel_mismatch="error")
    pre = gray_model.make_preprocessor()
    with pytest.raises(DataError, match="image mode RGB"):
        pre(Image.open(files["rgb"]), train=False)
    assert pre(Image.open(files["gray"]), train=False).shape == (1, 32, 32)


def test_image_bad_arrays(built: dict[str, Adapter]) -> None:
    pre = built["image"].make_preprocessor()
    assert pre(np.zeros((20, 20, 3), dtype=np.uint8), train=False).shape == (3, 32, 32)
    with pytest.raises(DataError, match="dtype"):
        pre(np.zeros((20, 20, 3), dtype=np.float32), train=False)
    with pytest.raises(DataError, match="NaN"):
        pre(np.full((20, 20), np.nan), train=False)
    with pytest.raises(DataError, match="shape"):
        pre(np.zeros((20, 20, 2), dtype=np.uint8), train=False)


# --------------------------------------------------------------------------- audio


def test_audio_files_are_what_the_tests_expect(files: dict) -> None:
    info = sf.info(str(files["tone16k"]))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (
        FILE_RATE,
        1,
        "PCM_16",
        4000,
    )
    assert sf.info(str(files["stereo"])).channels == 2


@pytest.mark.parametrize("name", AUDIO)
def test_audio_resampled_and_padded(name: str, built: dict[str, Adapter], files: dict) -> None:
    pre = built[name].make_preprocessor()
    data, rate = sf.read(files["tone16k"])
    assert rate == FILE_RATE and data.shape == (4000,)
    wave = pre.waveform((data, rate)).numpy()
    # 0.25 s at 8 kHz is 2000 samples, zero-padded symmetrically to the 4000-sample clip
    assert wave.shape == (CLIP,)
    assert not wave[:1000].any() and not wave[3000:].any()
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2000) / MODEL_RATE)
    assert np.abs(wave[1000:3000] - expected)[50:-50].max() < 2e-3
    if name in WAVEFORM:
        assert torch.equal(pre((data, rate), train=False), torch.from_numpy(wave))


@pytest.mark.parametrize("name", AUDIO)
def test_audio_stereo_downmixed_and_cropped(name: str, built: dict, files: dict) -> None:
    pre = built[name].make_preprocessor()
    data, rate = sf.read(files["stereo"])
    assert rate == MODEL_RATE and data.shape == (6000, 2)
    wave = pre.waveform((data, rate))
    expected = data.mean(axis=1)[1000:5000].astype(np.float32)  # centre 0.5 s
    assert np.allclose(wave.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("name", AUDIO)
def test_audio_downmix_and_resample_off(name: str, files: dict) -> None:
    pre = build(name, audio__downmix=False, audio__resample=False).make_preprocessor()
    with pytest.raises(DataError, match="downmix"):
        pre(sf.read(files["stereo"]), train=False)
    with pytest.raises(DataError, match=r"16000 Hz.*resample"):
        pre(sf.read(files["tone16k"]), train=False)
    # a mono clip at the model's rate is still fine, as is a (samples, 1) array
    data, rate = sf.read(files["stereo"])
    assert pre.waveform((data[:, 0], rate)).shape == (CLIP,)
    assert pre.waveform((data[:, :1], rate)).shape == (CLIP,)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (np.zeros(100), "pair"),
        ((np.zeros((0,)), MODEL_RATE), "at least one sample"),
        ((np.zeros((10, 2, 2)), MODEL_RATE), "shape"),
        ((np.full(100, np.nan), MODEL_RATE), "NaN"),
    ],
)
def test_audio_bad_input(raw: Any, match: str, built: dict[str, Adapter]) -> None:
    with pytest.raises(DataError, match=match):
        built["audio_cnn"].make_preprocessor()(raw, train=False)


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("raw", ["", "   \n", None, 3])
def test_text_empty_or_not_a_string(raw: Any, built: dict[str, Adapter]) -> None:
    with pytest.raises(DataError):
        built["text"].make_preprocessor()(raw, train=False)


def test_text_collate_pads_and_truncates(built: dict[str, Adapter]) -> None:
    pre = built["text"].make_preprocessor()
    long = " ".join(["word"] * 50)
    batch = pre.collate([pre("hi", train=False), pre(long, train=False)])
    assert batch["input_ids"].shape == (2, 16)  # text.max_length
    assert batch["attention_mask"][1].all() and batch["attention_mask"][0].sum() < 16


def test_text_mean_pooling_ignores_padding(built: dict[str, Adapter]) -> None:
    adapter = built["text"]
    pre = adapter.make_preprocessor()
    with torch.no_grad():
        alone = adapter(pre.collate([TEXTS[0]])).features
        padded = adapter(pre.collate(list(TEXTS))).features
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_text_pooling_cls_vs_mean(built: dict[str, Adapter]) -> None:
    mean_model = built["text"]
    cls_model = build("text", text__pooling="cls")
    cls_model.load_state_dict(mean_model.state_dict())
    batch = mean_model.make_preprocessor().collate(list(TEXTS))
    with torch.no_grad():
        hidden = mean_model.encoder(**batch).last_hidden_state
        mean_features = mean_model(batch).features
        cls_features = cls_model(batch).features
    assert torch.allclose(cls_features, hidden[:, 0])
    mask = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(mean_features, (hidden * mask).sum(1) / mask.sum(1), atol=1e-6)
    assert not torch.allclose(cls_features, mean_features, atol=1e-3)


def test_timm_feature_width_comes_from_what_the_model_returns():
    """MobileNetV3's pooled output (1024) is wider than its num_features (288)."""
    spec = tiny_spec("image", timm__model="mobilenetv3_small_050")
    spec.timm.kwargs = {}  # drop the tiny ResNet's arguments
    adapter = build_adapter(spec)
    assert adapter.feature_dim == 1024
    assert adapter(adapter.example_batch(2)).embedding.shape == (2, 16)


def test_an_adapters_wrong_setting_is_named_at_the_models_key() -> None:
    """The backbone reports the field (timm.model); build_adapter names the model's key."""
    spec = tiny_spec("image", timm__model="resnet_nope")
    with pytest.raises(ConfigError, match=r"^teachers\.a\.timm\.model: timm has no model"):
        build_adapter(spec, key="teachers.a")


def test_a_setting_error_reads_as_its_field_until_the_config_layer_names_the_key() -> None:
    from mmkd.errors import SettingError, settings_at

    err = SettingError("folder.train", "required")
    assert isinstance(err, ConfigError) and str(err) == "folder.train: required"
    with pytest.raises(ConfigError, match=r"^data\.folder\.train: required$"), settings_at("data"):
        raise err
