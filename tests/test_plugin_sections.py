"""A plugin dataset, loss term and adapter, each one file outside the package (the README's
examples, verbatim), loaded through run.plugins: each gets its own typed, checked section in
the schema (`data.<name>`, `losses.<name>`, `student.<name>`), the dataset's path key is made
absolute, and tiny runs train with them; the adapter's section is exported with the model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny import small_run, tiny_overrides

import mmkd.losses.base as loss_base
from mmkd.adapters import ADAPTER_CONFIGS, ADAPTERS
from mmkd.config import compose, validate
from mmkd.data import DATASETS
from mmkd.errors import ConfigError
from mmkd.export import SPEC, load_exported
from mmkd.losses import TERMS
from mmkd.train import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name: str) -> str:
    """The README's example file `name` (from "Add an adapter, a dataset or a loss term", or
    "Bring your own model" for the adapter)."""
    text = README.read_text()
    match = re.search(rf"<!-- plugin-example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README lost its {name} example"
    return match.group(1)


@pytest.fixture
def plugins(tmp_path, monkeypatch) -> Path:
    """The two plugin files in a folder on sys.path; the registries and sys.modules are
    restored afterwards, so no other test sees the plugin names."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "tones_plugin.py").write_text(readme_example("tones_plugin.py"))
    (folder / "center_pull_plugin.py").write_text(readme_example("center_pull_plugin.py"))
    (folder / "my_teacher.py").write_text(readme_example("my_teacher.py"))
    (tmp_path / "classes.txt").write_text("low\nmid\nhigh\n")
    monkeypatch.syspath_prepend(str(folder))
    for registry in (DATASETS, TERMS, ADAPTERS, ADAPTER_CONFIGS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    monkeypatch.setattr(loss_base, "TERM_ORDER", list(loss_base.TERM_ORDER))
    yield tmp_path
    for module in ("tones_plugin", "center_pull_plugin", "my_teacher"):
        sys.modules.pop(module, None)


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [
        "teacher=none",
        "losses=supervised",
        "data.train_labels=true",
        *tiny_overrides("student", "audio_cnn"),
        "student.head.classifier=true",
        "run.plugins=[tones_plugin, center_pull_plugin]",
        "data.name=tones",
        "data.tones.classes_file=classes.txt",  # relative: made absolute at start-up
        "data.batch_size=8",
        "losses.center_pull.weight=0.5",
        "losses.center_pull.power=1.5",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "run.latency_seconds=0.02",
        f"run.dir={run_dir}",
        *extra,
    ]


def test_plugin_dataset_and_loss_term_train_with_their_sections(plugins, monkeypatch):
    monkeypatch.chdir(plugins)
    run_dir = plugins / "run"
    assert main(overrides(run_dir)) == 0
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.data.tones.classes_file == str(plugins / "classes.txt")  # made absolute
    assert "demo" not in saved.data  # only the chosen dataset's section
    assert saved.losses.center_pull == {"weight": 0.5, "power": 1.5, "reduce": "mean"}
    lines = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    assert "train/center_pull" in lines[0].split(",")  # the plugin term was computed
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "student/accuracy" in metrics


@pytest.mark.parametrize(
    ("run", "item", "message"),
    [
        ("dataset", "data.tones.per_class=0", r"data\.tones\.per_class: must be > 0, got 0"),
        ("dataset", "data.tones.wave=saw", r"data\.tones\.wave: 'saw' is not one of sine, square"),
        ("dataset", "data.tones.per_class=many", r"data\.tones\.per_class"),  # the type, at compose
        (
            "dataset",
            "data.tones.colour=red",
            r"data\.tones\.colour",
        ),  # an unknown key of the section
        (
            "dataset",
            "losses.center_pull.power=-1",
            r"losses\.center_pull\.power: must be > 0, got -1",
        ),
        (
            "dataset",
            "losses.center_pull.reduce=max",
            r"losses\.center_pull\.reduce: 'max' is not one of",
        ),
        ("dataset", "losses.center_pull.powr=2", r"losses\.center_pull\.powr"),
        (
            "dataset",
            "data.demo.num_train=8",
            r"data\.demo\.num_train: a setting of dataset demo, but data",
        ),
        ("adapter", "student.inhouse.width=0", r"^student\.inhouse\.width: must be > 0, got 0$"),
        ("adapter", "student.inhouse.width=wide", r"student\.inhouse\.width"),  # the type
        ("adapter", "student.inhouse.widht=8", r"student\.inhouse\.widht"),  # an unknown key
        (  # a section of a built-in adapter the plugin does not read
            "adapter",
            "student.timm.model=resnet18",
            r"student\.timm\.model: a setting of the audio_timm, image adapters, but "
            r"student\.adapter=inhouse \(which reads student\.image, student\.inhouse\)",
        ),
    ],
)
def test_a_wrong_plugin_setting_fails_naming_the_key(plugins, run, item, message):
    """Dataset and loss-term sections (`overrides`) and an adapter's (`adapter_overrides`)."""
    build = overrides if run == "dataset" else adapter_overrides
    with pytest.raises(ConfigError, match=message):
        validate(compose(build(plugins / "run", item)))


def test_a_plugin_section_for_a_dataset_not_chosen_is_refused(plugins):
    items = [*overrides(plugins / "run"), "data.name=demo"]
    refused = r"data\.tones\.classes_file: a setting of dataset tones, but data\.name=demo"
    with pytest.raises(ConfigError, match=refused):
        compose(items)


# --------------------------------------------------------------------------- a plugin adapter


def adapter_overrides(run_dir: Path, *extra: str) -> list[str]:
    """A supervised tiny run of the README's plugin adapter as the student. The default student
    file (tiny_image) sets timm and image settings: the plugin reads image (kept), not timm."""
    return [
        "teacher=none",
        "losses=supervised",
        "data.train_labels=true",
        "run.plugins=[my_teacher]",
        "student.adapter=inhouse",
        "student.inhouse.width=16",
        "student.head.classifier=true",
        *small_run(train=32),
        f"run.dir={run_dir}",
        *extra,
    ]


def test_plugin_adapter_trains_with_its_own_section_and_exports_it(plugins, monkeypatch):
    monkeypatch.chdir(plugins)
    conv = torch.nn.Conv2d(3, 16, 3, stride=2)  # the example's InHouseNet(16), saved by a user
    torch.save({f"layers.0.{k}": v for k, v in conv.state_dict().items()}, plugins / "net.pt")
    run_dir = plugins / "adapter_run"
    assert main(adapter_overrides(run_dir, "student.inhouse.checkpoint=net.pt")) == 0
    saved = OmegaConf.load(run_dir / "config.yaml")
    checkpoint = str(plugins / "net.pt")  # a path key of the section: made absolute
    assert saved.student.inhouse == {"checkpoint": checkpoint, "width": 16}
    assert saved.student.image.img_size == 32 and "timm" not in saved.student
    exported = OmegaConf.load(run_dir / "student" / SPEC)
    assert {"image", "inhouse"} <= set(exported) and "timm" not in exported
    assert exported.inhouse.checkpoint is None  # the section's export rule
    model = load_exported(run_dir / "student")
    assert model.model.feature_dim == 16 and model.model.spec.inhouse.width == 16
    assert "student/accuracy" in json.loads((run_dir / "metrics.json").read_text())


def test_a_plugin_adapter_section_is_refused_for_another_adapter(plugins):
    items = [*adapter_overrides(plugins / "run"), "student.adapter=audio_cnn"]
    # (other tests may have registered the same example under other names: inhouse_a, ...)
    refused = r"student\.inhouse\.width: a setting of the inhouse(, \w+)* adapters?, but stud"
    with pytest.raises(ConfigError, match=refused):
        compose(items)
