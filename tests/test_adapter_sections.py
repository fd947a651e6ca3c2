"""Each adapter's config sections: their own checks, the unread-section error, export rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny import tiny_spec

from mmkd.adapters import ADAPTERS, build_adapter
from mmkd.config import compose, validate
from mmkd.config.schema import ADAPTER_SECTIONS
from mmkd.errors import ConfigError
from mmkd.export import SPEC, WEIGHTS, load_export_spec
from mmkd.io import save_state


def check(*overrides: str) -> None:
    validate(compose(list(overrides)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # image (read by the image student of the default config)
        (["student.image.mean=[0.5,0.5]"], r"student\.image\.mean: has 2 values; .*in_chans is 3"),
        (["student.image.in_chans=1", "student.image.std=[0.2,0.2,0.2]"], r"image\.std: has 3"),
        (["student.image.std=[0.5,0,0.5]"], r"student\.image\.std: every value must be > 0"),
        (["student.image.crop_padding=-1"], r"student\.image\.crop_padding: must be >= 0"),
        (["student.image.img_size=0"], r"student\.image\.img_size: must be > 0, got 0"),
        (["student.image.channel_mismatch=drop"], r"channel_mismatch: 'drop' is not one of"),
        # text (the default teacher is MiniLM)
        (["teacher.text.pooling=max"], r"teacher\.text\.pooling: 'max' is not one of mean, cls"),
        (["teacher.text.max_length=0"], r"teacher\.text\.max_length: must be > 0"),
        # audio and cnn
        (["student=tiny_audio", "student.cnn.channels=[]"], r"student\.cnn\.channels: needs"),
        (["student=tiny_audio", "student.cnn.channels=[8,0]"], r"student\.cnn\.channels"),
        (["student=tiny_audio", "student.audio.n_mels=0"], r"student\.audio\.n_mels: must be > 0"),
        (["student=tiny_audio", "student.audio.clip_seconds=0"], r"audio\.clip_seconds: must"),
        (
            ["student=tiny_audio", "student.audio.gain_db=-1"],
            r"student\.audio\.gain_db: must be >=",
        ),
        # extra students are checked too
        (
            [
                "extra_students.audio={adapter: audio_cnn}",
                "extra_students.audio.audio.hop_length=0",
            ],
            r"extra_students\.audio\.audio\.hop_length: must be > 0",
        ),
    ],
)
def test_each_section_checks_its_own_fields(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check(*overrides)


def test_a_section_is_checked_only_for_adapters_that_read_it(monkeypatch) -> None:
    from mmkd.adapters.image_config import ImageCfg

    def refuse(cls, cfg, key):
        raise ConfigError(f"{key}: checked")

    monkeypatch.setattr(ImageCfg, "check", classmethod(refuse))
    check("student=tiny_audio")  # audio_cnn does not read image: its check does not run
    with pytest.raises(ConfigError, match=r"^student\.image: checked$"):
        check("student=tiny_image")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["student=tiny_audio", "student.text.pooling=cls"],
            r"^student\.text: the audio_cnn adapter does not read text settings "
            r"\(it reads audio, cnn\); changed from the defaults: text\.pooling$",
        ),
        (
            ["student.cnn.channels=[4]"],  # the default student is an image model
            r"^student\.cnn: the image adapter does not read cnn settings \(it reads timm, image\)",
        ),
        (
            ["teacher.timm.model=resnet18", "teacher.timm.pretrained=true"],
            r"^teacher\.timm: the text adapter .* changed from the defaults: timm\.pretrained$",
        ),
        (
            ["student=tiny_audio", "student.wav2vec2.weights_file=w.pt"],
            r"^student\.wav2vec2: the audio_cnn adapter .*: wav2vec2\.weights_file$",
        ),
    ],
)
def test_a_changed_section_the_adapter_does_not_read_is_an_error(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check(*overrides)


def test_group_file_values_count_as_defaults_when_the_adapter_is_swapped() -> None:
    # the default student file (tiny_image) sets timm and image settings; swapping the adapter
    # on the command line leaves them unused, as documented in the README ("Swap an adapter")
    check("student.adapter=audio_cnn")
    check("student.adapter=audio_wav2vec2", "student.wav2vec2.overrides.encoder_num_layers=2")
    # but a change made on the command line to a section the new adapter ignores is refused
    with pytest.raises(ConfigError, match=r"^student\.image: .*: image\.img_size$"):
        check("student.adapter=audio_cnn", "student.image.img_size=48")


def test_a_config_not_from_compose_compares_with_the_schema_defaults() -> None:
    cfg = compose(["student.adapter=audio_cnn"])
    with pytest.raises(ConfigError, match=r"student\.timm: the audio_cnn adapter"):
        validate(cfg.copy())  # a copy has no record of its group files


def test_typos_in_a_section_still_fail_at_compose_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"student\.timm\.modle"):
        compose(["student.timm.modle=x"])
    with pytest.raises(ConfigError, match=r"teacher\.text\.poling"):
        compose(["teacher.text.poling=cls"])


def test_every_built_in_adapter_names_known_sections() -> None:
    reads = {name: ADAPTERS.get(name).read_sections() for name in ADAPTERS}
    assert reads["image"] == ("timm", "image")
    assert reads["text"] == ("text",)
    assert reads["text_rnn"] == ("text_rnn",)
    assert reads["audio_cnn"] == ("audio", "cnn")
    assert reads["audio_timm"] == ("audio", "timm")
    assert reads["audio_wav2vec2"] == reads["audio_hubert"] == ("audio", "wav2vec2")
    assert reads["crepe"] == ("crepe",)
    assert set(ADAPTER_SECTIONS) == {
        *("timm", "image", "text", "text_rnn", "audio", "cnn", "wav2vec2", "crepe"),
    }


def test_schema_and_compose_import_no_model_library() -> None:
    code = (
        "import sys; import mmkd.config.schema; from mmkd.config import compose; "
        "import mmkd.adapters.sections; "
        # torch itself is fine (the losses schema comes from the loss-term registry's modules)
        "print(sorted(m for m in ('timm', 'transformers', 'torchaudio') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- exports

ALL_SWITCHES = {
    "timm.pretrained": True,
    "timm.pretrained_file": "backbone.pth",
    "text.pretrained": True,
    "wav2vec2.weights_file": "w2v.safetensors",
}


@pytest.mark.parametrize(
    ("name", "sections", "cleared"),
    [
        ("image", {"timm", "image"}, {"timm.pretrained": False, "timm.pretrained_file": None}),
        ("text", {"text"}, {"text.pretrained": False}),
        ("audio_cnn", {"audio", "cnn"}, {}),
        ("audio_wav2vec2", {"audio", "wav2vec2"}, {"wav2vec2.weights_file": None}),
    ],
)
def test_export_clears_only_the_adapter_switches_and_omits_other_sections(
    name: str, sections: set[str], cleared: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(name)
    adapter = build_adapter(spec)
    for key, value in ALL_SWITCHES.items():  # switched on after the build (nothing loads)
        OmegaConf.update(adapter.spec, key, value)
    exported = adapter.export_spec(tmp_path)
    assert set(exported) & set(ADAPTER_SECTIONS) == sections
    assert {"adapter", "weights", "freeze_encoder", "head", "options"} <= set(exported)
    for key, value in cleared.items():
        assert OmegaConf.select(exported, key) == value
    # the saved spec loads; the omitted sections come back with their defaults
    OmegaConf.save(exported, tmp_path / SPEC)
    loaded = load_export_spec(tmp_path)
    assert loaded.adapter == name and loaded.head.embed_dim == 16
    for other in set(ADAPTER_SECTIONS) - sections:
        assert not ADAPTER_SECTIONS[other].changed(loaded[other]), other


def test_an_old_full_exported_spec_still_loads_builds_and_validates(tmp_path: Path) -> None:
    """Exports written before sections were per adapter hold every section (resolved, with
    every pretrained switch off): they load, rebuild the same weights, and pass validation
    when adopted as a teacher."""
    spec = tiny_spec("audio_cnn")
    adapter = build_adapter(spec)
    old = OmegaConf.create(OmegaConf.to_container(spec, resolve=True))  # the old export_spec
    old.weights = None
    old.timm.pretrained, old.timm.pretrained_file = False, None
    old.text.pretrained, old.wav2vec2.weights_file = False, None
    assert set(ADAPTER_SECTIONS) <= set(old)
    OmegaConf.save(old, tmp_path / SPEC)
    save_state(tmp_path / WEIGHTS, adapter.state_dict())
    loaded = load_export_spec(tmp_path)
    assert list(loaded.cnn.channels) == [8, 16] and loaded.text.pretrained is False
    loaded.weights = str(tmp_path)
    rebuilt = build_adapter(loaded)
    want, got = adapter.state_dict(), rebuilt.state_dict()
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    # its unread sections (text.pretrained=false, resolved text.model) count as defaults
    cfg = compose(["losses=supervised", "data.train_labels=true", "teacher=none"])
    cfg.student = loaded
    validate(cfg)
