"""Each adapter's config sections: registered per adapter, the only ones its spec holds (another
adapter's are refused at compose naming the key), their own checks, export rules, old layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny import tiny_spec

from mmkd.adapters import ADAPTERS, adapter_sections, build_adapter
from mmkd.adapters.sections import section_names
from mmkd.config import compose, compose_saved, default_config_dir, validate
from mmkd.errors import ConfigError
from mmkd.export import SPEC, WEIGHTS, load_export_spec
from mmkd.io import save_state

COMMON = ("adapter", "weights", "freeze_encoder", "features", "head")  # every spec has these
BUILT_IN_SECTIONS = {
    section: cls for name in ADAPTERS for section, cls in adapter_sections(name).items()
}


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
            r"^command line: student\.text\.pooling: a setting of the text adapter, but "
            r"student\.adapter=audio_cnn \(which reads student\.audio, student\.cnn\)$",
        ),
        (
            ["student.cnn.channels=[4]"],  # the default student is an image model
            r"^command line: student\.cnn\.channels: a setting of the audio_cnn adapter, but "
            r"student\.adapter=image \(which reads student\.timm, student\.image\)$",
        ),
        (
            ["teacher.timm.model=resnet18", "teacher.timm.pretrained=true"],
            r"^command line: teacher\.timm\.model: a setting of the audio_timm, image adapters, "
            r"but teacher\.adapter=text \(which reads teacher\.text\)$",
        ),
        (
            ["student=tiny_audio", "student.wav2vec2.weights_file=w.pt"],
            r"student\.wav2vec2\.weights_file: a setting of the audio_hubert, audio_wav2vec2 ",
        ),
        (  # named models have their own adapter's schema each
            ["extra_students.audio={adapter: audio_cnn}", "extra_students.audio.image.hflip=0.5"],
            r"extra_students\.audio\.image\.hflip: .* but extra_students\.audio\.adapter="
            r"audio_cnn \(which reads extra_students\.audio\.audio, extra_students\.audio\.cnn\)",
        ),
        (
            ["teacher=none", "teachers.t={adapter: text}", "teachers.t.crepe.model=tiny"],
            r"teachers\.t\.crepe\.model: a setting of the crepe adapter, but teachers\.t\.",
        ),
    ],
)
def test_a_section_of_an_adapter_not_chosen_is_refused_at_compose(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_a_spec_holds_only_its_adapters_sections() -> None:
    cfg = compose(["teacher=none", "teachers.t={adapter: text}"])
    assert set(cfg.student) == {*COMMON, "timm", "image"}
    assert set(cfg.teachers.t) == {*COMMON, "text", "losses"}
    cfg = compose(["student=tiny_audio", "extra_students.w={adapter: audio_wav2vec2}"])
    assert set(cfg.student) == {*COMMON, "audio", "cnn"}
    assert set(cfg.extra_students.w) == {*COMMON, "audio", "wav2vec2"}


def test_a_group_files_sections_are_dropped_when_another_adapter_is_chosen() -> None:
    # the default student file (tiny_image) sets timm and image settings and a head; choosing
    # another adapter on the command line keeps the head and drops the sections it does not read
    cfg = compose(["student.adapter=audio_cnn"])
    assert set(cfg.student) == {*COMMON, "audio", "cnn"}
    tiny_image = OmegaConf.load(default_config_dir() / "student" / "tiny_image.yaml")
    assert cfg.student.head == OmegaConf.merge(cfg.student.head, tiny_image.head)
    validate(cfg)
    cfg = compose(["student.adapter=audio_wav2vec2", "student.wav2vec2.overrides.x=2"])
    assert cfg.student.wav2vec2.overrides == {"x": 2}
    # the sections the new adapter also reads are kept (audio_timm reads timm too)
    cfg = compose(["student.adapter=audio_timm"])
    assert cfg.student.timm == OmegaConf.merge(cfg.student.timm, tiny_image.timm)


def test_a_copied_or_reloaded_config_validates_the_same() -> None:
    cfg = compose(["student.adapter=audio_cnn"])
    validate(cfg.copy())  # no side table: a copy is the same config
    validate(compose_saved(OmegaConf.create(OmegaConf.to_container(cfg))))
    cfg.student.adapter = "image"  # changed after compose: its sections are not in the spec
    with pytest.raises(ConfigError, match=r"^student\.timm: missing; this config was not"):
        validate(cfg)


def test_options_are_refused_in_one_line_saying_what_to_do() -> None:
    with pytest.raises(
        ConfigError, match=r"^command line: teacher\.options: no longer exists; "
    ) as err:
        compose(["teacher.options.checkpoint=net.pt"])
    assert "register_adapter_config" in str(err.value) and "\n" not in str(err.value)


def test_typos_in_a_section_still_fail_at_compose_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"student\.timm\.modle"):
        compose(["student.timm.modle=x"])
    with pytest.raises(ConfigError, match=r"teacher\.text\.poling"):
        compose(["teacher.text.poling=cls"])


def test_every_built_in_adapter_registers_the_sections_it_reads() -> None:
    reads = {name: tuple(adapter_sections(name)) for name in ADAPTERS}
    assert reads["image"] == ("timm", "image")
    assert reads["text"] == ("text",)
    assert reads["text_rnn"] == ("text_rnn",)
    assert reads["audio_cnn"] == ("audio", "cnn")
    assert reads["audio_timm"] == ("audio", "timm")
    assert reads["audio_wav2vec2"] == reads["audio_hubert"] == ("audio", "wav2vec2")
    assert reads["crepe"] == ("crepe",)
    built_in = {"timm", "image", "text", "text_rnn", "audio", "cnn", "wav2vec2", "crepe"}
    # plugin adapters registered by other tests of this process add their own sections
    assert built_in <= set(section_names())
    assert {s for name in reads for s in reads[name] if s not in built_in} == (
        set(section_names()) - built_in
    )


def test_schema_and_compose_import_no_model_library() -> None:
    code = (
        "import sys; import mmkd.config.schema; from mmkd.config import compose; "
        "import mmkd.adapters.sections; from mmkd.adapters import adapter_sections; "
        "adapter_sections('image'); compose(['student=tiny_audio']); "
        # torch itself is fine (the losses schema comes from the loss-term registry's modules)
        "print(sorted(m for m in ('timm', 'transformers', 'torchaudio') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- exports

SWITCHES = {
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
def test_export_writes_the_adapters_sections_with_their_switches_off(
    name: str, sections: set[str], cleared: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(name)
    adapter = build_adapter(spec)
    for key, value in SWITCHES.items():  # switched on after the build (nothing loads)
        section, field = key.split(".")
        if section in sections:  # the adapter holds its spec as typed values (a dataclass)
            setattr(getattr(adapter.spec, section), field, value)
    exported = adapter.export_spec(tmp_path)
    assert set(exported) == {"adapter", "weights", "freeze_encoder", "features", "head", *sections}
    for key, value in cleared.items():
        assert OmegaConf.select(exported, key) == value
    OmegaConf.save(exported, tmp_path / SPEC)
    loaded = load_export_spec(tmp_path)
    assert loaded.adapter == name and loaded.head.embed_dim == 16
    assert set(loaded) == set(exported)


def old_full_spec(spec) -> dict:
    """An adapter spec as exports and saved configs wrote it before specs held only their
    adapter's sections: every built-in section (resolved, pretrained switches off) and options."""
    old = OmegaConf.to_container(spec, resolve=True)
    for section, cls in BUILT_IN_SECTIONS.items():
        old.setdefault(section, OmegaConf.to_container(OmegaConf.structured(cls), resolve=True))
    old["timm"]["pretrained"], old["timm"]["pretrained_file"] = False, None
    old["text"]["pretrained"], old["wav2vec2"]["weights_file"] = False, None
    old["options"] = {}
    return old


def test_an_old_full_exported_spec_still_loads_builds_and_validates(tmp_path: Path) -> None:
    """Exports written before sections were per adapter hold every section and `options`: they
    load (the sections the adapter does not read dropped), rebuild the same weights, and pass
    validation as a student."""
    spec = tiny_spec("audio_cnn")
    adapter = build_adapter(spec)
    old = old_full_spec(spec)
    old["weights"] = None
    OmegaConf.save(OmegaConf.create(old), tmp_path / SPEC)
    save_state(tmp_path / WEIGHTS, adapter.state_dict())
    loaded = load_export_spec(tmp_path)
    assert set(loaded) == {*COMMON, "audio", "cnn"} and list(loaded.cnn.channels) == [8, 16]
    loaded.weights = str(tmp_path)
    rebuilt = build_adapter(loaded)
    want, got = adapter.state_dict(), rebuilt.state_dict()
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    # named as a model's weights, the export brings its adapter's schema at compose time
    cfg = compose(["losses=supervised", "data.train_labels=true", f"teacher.weights={tmp_path}"])
    assert cfg.teacher.adapter == "audio_cnn" and set(cfg.teacher) == {*COMMON, "audio", "cnn"}
    with pytest.raises(
        ConfigError,
        match=r"teacher\.text\.pooling: .* but teacher\.adapter="
        r"audio_cnn, the adapter of its exported weights ",
    ):
        compose([f"teacher.weights={tmp_path}", "teacher.text.pooling=cls"])
    cfg.teacher = None
    cfg.student = loaded
    validate(cfg)


def test_a_config_saved_with_every_adapter_section_still_loads() -> None:
    """Runs saved before adapters owned their sections wrote every section and `options` in
    each spec: on load the sections its adapter does not read are dropped; a non-empty
    `options` (a plugin's settings) is refused in one line."""
    saved = OmegaConf.to_container(compose(["student=tiny_audio"]))
    saved["student"] = old_full_spec(OmegaConf.create(saved["student"]))
    saved["teacher"] = old_full_spec(OmegaConf.create(saved["teacher"]))
    cfg = compose_saved(OmegaConf.create(saved), ["student.cnn.dropout=0.2"])
    assert set(cfg.student) == {*COMMON, "audio", "cnn"} and cfg.student.cnn.dropout == 0.2
    assert set(cfg.teacher) == {*COMMON, "text"}
    validate(cfg)
    saved["student"]["options"] = {"checkpoint": "net.pt"}
    with pytest.raises(ConfigError, match=r"^config\.yaml: student\.options: no longer exists"):
        compose_saved(OmegaConf.create(saved))
