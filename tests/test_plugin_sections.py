"""A plugin dataset and a plugin loss term, each one file outside the package (the README's
examples, verbatim), loaded through run.plugins: each gets its own typed, checked section in
the schema (`data.<name>`, `losses.<name>`), the dataset's path key is made absolute, and a
tiny run trains with both."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny import tiny_overrides

import mmkd.losses.base as loss_base
from mmkd.config import compose, validate
from mmkd.data import DATASETS
from mmkd.errors import ConfigError
from mmkd.losses import TERMS
from mmkd.train import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name: str) -> str:
    """The README's example file `name` (its "Add a dataset or a loss term" section)."""
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
    (tmp_path / "classes.txt").write_text("low\nmid\nhigh\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))
    monkeypatch.setattr(TERMS, "_items", dict(TERMS._items))
    monkeypatch.setattr(loss_base, "TERM_ORDER", list(loss_base.TERM_ORDER))
    yield tmp_path
    for module in ("tones_plugin", "center_pull_plugin"):
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
    ("item", "message"),
    [
        ("data.tones.per_class=0", r"data\.tones\.per_class: must be > 0, got 0"),
        ("data.tones.wave=saw", r"data\.tones\.wave: 'saw' is not one of sine, square"),
        ("data.tones.per_class=many", r"data\.tones\.per_class"),  # the type, at compose
        ("data.tones.colour=red", r"data\.tones\.colour"),  # an unknown key of the section
        ("losses.center_pull.power=-1", r"losses\.center_pull\.power: must be > 0, got -1"),
        ("losses.center_pull.reduce=max", r"losses\.center_pull\.reduce: 'max' is not one of"),
        ("losses.center_pull.powr=2", r"losses\.center_pull\.powr"),
        ("data.demo.num_train=8", r"data\.demo\.num_train: a setting of dataset demo, but data"),
    ],
)
def test_a_wrong_plugin_setting_fails_naming_the_key(plugins, item, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides(plugins / "run", item)))


def test_a_plugin_section_for_a_dataset_not_chosen_is_refused(plugins):
    items = [*overrides(plugins / "run"), "data.name=demo"]
    refused = r"data\.tones\.classes_file: a setting of dataset tones, but data\.name=demo"
    with pytest.raises(ConfigError, match=refused):
        compose(items)
