"""Config errors fail at start-up with a short message naming the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mmkd.config import compose, validate
from mmkd.errors import ConfigError
from mmkd.train import main


def compose_and_validate(*overrides: str):
    cfg = compose(list(overrides))
    validate(cfg)
    return cfg


def test_default_config_composes_and_validates():
    cfg = compose_and_validate()
    assert cfg.run.name == "demo_bind"
    assert cfg.teacher.adapter == "text"
    assert cfg.losses.contrastive.weight > 0


def test_group_and_key_overrides_apply_in_order():
    cfg = compose_and_validate(
        "student=tiny_audio", "student.cnn.channels=[4,8]", "trainer.max_epochs=2"
    )
    assert cfg.student.adapter == "audio_cnn"
    assert list(cfg.student.cnn.channels) == [4, 8]
    assert cfg.trainer.max_epochs == 2


def test_teacher_none_sets_null():
    cfg = compose(["teacher=none", "losses=supervised", "data.train_labels=true"])
    assert cfg.teacher is None
    validate(cfg)


def test_a_teacher_set_key_by_key_after_none_has_its_adapters_sections():
    """`teacher=none` then `teacher.KEY=...` builds the teacher on its adapter's spec: its
    sections were refused before, as if they belonged to another adapter."""
    cfg = compose(["teacher=none", "teacher.adapter=audio_cnn", "teacher.cnn.channels=[4,8]"])
    assert cfg.teacher.adapter == "audio_cnn" and list(cfg.teacher.cnn.channels) == [4, 8]
    assert cfg.teacher.audio.n_mels > 0  # the section's defaults are there


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student.adpter=image", r"student\.adpter.*Did you mean.*adapter"),
        ("trainer.max_epochs=abc", r"trainer\.max_epochs.*could not be converted"),
        ("nonsense.key=1", r"nonsense"),
        ("student=nope", r"student=nope.*Available: .*tiny_image"),
        ("experiment=nope", r"experiment=nope.*Available: .*demo_bind"),
        ("student.image.in_chans=3.5", r"student\.image\.in_chans"),
        ("noequals", r"expected key=value"),
        (
            "+losses.kd.weight=1",
            r"\+losses\.kd\.weight=1.*no Hydra-style '\+'.*losses\.kd\.weight=1",
        ),
    ],
)
def test_compose_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose([override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["student.adapter=imgae"],
            r"student\.adapter: unknown adapter 'imgae'\. Did you mean 'image'\? Valid names: "
            r"audio_cnn, audio_hubert, audio_timm, audio_wav2vec2, crepe, image, text, text_rnn",
        ),
        (["teacher.adapter=nope"], r"teacher\.adapter: unknown adapter 'nope'"),
        (["losses.kd.temperature=0"], r"losses\.kd\.temperature: must be > 0"),
        (["losses.contrastive.temperature=-1"], r"losses\.contrastive\.temperature: must be > 0"),
        (["losses.embed.weight=-0.5"], r"losses\.embed\.weight: must be >= 0"),
        (["losses.embed.kind=l1"], r"losses\.embed\.kind: 'l1' is not one of cosine, mse"),
        (["student.head.embed_dim=-3"], r"student\.head\.embed_dim: must be > 0"),
        (["student.image.mean=[0.5,0.5]"], r"student\.image\.mean: has 2 values"),
        (["data.on_error=ignore"], r"data\.on_error"),
        (["losses.ce.weight=1"], r"losses\.ce\.weight: .*train_labels=false"),
        (["teacher=none"], r"losses\.embed\.weight: is 1\.0 but there is no teacher"),
        (["losses.contrastive.weight=0", "losses.embed.weight=0"], r"every weight is 0"),
        (
            ["student.image.img_size=${data.nothere}"],
            r"student\.image\.img_size: \$\{data\.nothere\} names a key this config does not",
        ),
    ],
)
def test_validation_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_and_validate(*overrides)


def test_cli_reports_config_errors_in_one_line_without_traceback(capsys, tmp_path):
    code = main(["student.adapter=nope", f"run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: student.adapter: unknown adapter 'nope'")
    assert "Traceback" not in err
    assert not (tmp_path / "config.yaml").exists()  # failed before any work


def test_schema_rejects_unknown_keys_in_experiment_files(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "config.yaml").write_text("defaults: {}\n")
    (tmp_path / "experiment" / "bad.yaml").write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"experiment/bad\.yaml: trainer\.max_epoch"):
        compose(["experiment=bad"], config_dir=tmp_path)


def test_every_shipped_experiment_composes_and_validates():
    from mmkd.config.compose import default_config_dir

    names = sorted(p.stem for p in (default_config_dir() / "experiment").glob("*.yaml"))
    assert "demo_bind" in names
    for name in names:
        cfg = compose([f"experiment={name}"])
        required = sorted(OmegaConf.missing_keys(cfg))
        if required:  # e.g. teacher.weights: the run fails at start-up naming the key
            with pytest.raises(ConfigError, match=rf"{required[0]}: required"):
                validate(cfg)
            cfg = compose([f"experiment={name}", *(f"{key}=/some/run/student" for key in required)])
        validate(cfg)
        OmegaConf.to_yaml(cfg, resolve=True)  # every interpolation resolves


def test_lightning_rejections_are_reported_as_config_errors(capsys, tmp_path):
    code = main(
        [
            "trainer.strategy=fsdp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"run.dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: trainer: ")
    assert "requires a GPU" in err and "Traceback" not in err


def test_a_mapping_on_the_command_line_replaces_a_free_form_mapping():
    cfg = compose(["student.timm.model=mobilenetv3_small_050", "student.timm.kwargs={}"])
    assert dict(cfg.student.timm.kwargs) == {}  # the tiny_image ResNet arguments are gone
    cfg = compose(["student.timm.kwargs={drop_rate: 0.1}"])
    assert dict(cfg.student.timm.kwargs) == {"drop_rate": 0.1}
    cfg = compose(["student.image={img_size: 48}"])  # typed sections still merge
    assert cfg.student.image.img_size == 48 and cfg.student.image.in_chans == 3


def test_an_interpolation_on_the_command_line_resolves_against_the_whole_config():
    cfg = compose_and_validate("student.image.img_size=${data.batch_size}", "data.batch_size=48")
    assert cfg.student.image.img_size == 48


def test_a_config_saved_with_every_dataset_section_still_loads(tmp_path):
    """Runs saved before datasets owned their sections wrote every built-in dataset's section
    and data.options; on load the sections the chosen dataset does not read are dropped."""
    from mmkd.config.compose import compose_saved
    from mmkd.config.schema import DATASET_CONFIGS

    saved = OmegaConf.to_container(compose(["data=fsdd", "data.fsdd.split=all"]))
    for cls in DATASET_CONFIGS:  # the old layout: every section, under its dataset's name
        name = cls.__module__.rpartition(".")[2]
        saved["data"].setdefault(name, OmegaConf.to_container(OmegaConf.structured(cls)))
    saved["data"]["options"] = {}
    assert {"manifest", "av_digits", "mnist"} <= set(saved["data"])
    cfg = compose_saved(OmegaConf.create(saved), ["data.fsdd.speakers=[jackson]"])
    sections = {k for k in cfg.data if OmegaConf.is_dict(cfg.data[k])}
    assert sections == {"fsdd", "frames"}
    assert cfg.data.fsdd.split == "all" and list(cfg.data.fsdd.speakers) == ["jackson"]
    with pytest.raises(ConfigError, match=r"data\.fsdd\.split: 'some'"):
        validate(compose_saved(OmegaConf.create(saved), ["data.fsdd.split=some"]))
