"""Plugins: an adapter defined outside the package (the README's example, verbatim) is selected
by name through run.plugins or an entry point, validated like a built-in, and trained with."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny import small_run, tiny_overrides

from mmkd.adapters import ADAPTERS
from mmkd.errors import ConfigError
from mmkd.train import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_plugin(name: str) -> str:
    """The README's plugin example, registering the adapter as `name`."""
    text = README.read_text()
    match = re.search(r"<!-- plugin-example: my_teacher.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its plugin example"
    code = match.group(1)
    assert 'NAME = "inhouse"' in code and "@ADAPTERS.register(NAME)" in code
    return code.replace('NAME = "inhouse"', f'NAME = "{name}"')


def write_plugin(folder: Path, module: str, adapter: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(readme_plugin(adapter))
    return folder


def teacher_checkpoint(folder: Path) -> tuple[Path, int]:
    """Weights for the example's InHouseNet (its state-dict keys, built without importing the
    plugin), saved as a user would; returns (file, number of parameters)."""
    conv = torch.nn.Conv2d(3, 64, 3, stride=2)
    state = {f"layers.0.{k}": v for k, v in conv.state_dict().items()}
    path = folder / "net.pt"
    torch.save(state, path)
    return path, sum(v.numel() for v in state.values())


def run_with_inhouse_teacher(run_dir: Path, adapter: str, *extra: str) -> dict[str, float]:
    code = main(
        [
            f"teacher.adapter={adapter}",
            "teacher.image.img_size=32",
            *tiny_overrides("student", "image"),
            *small_run(),
            f"run.dir={run_dir}",
            *extra,
        ]
    )
    assert code == 0
    return json.loads((run_dir / "metrics.json").read_text())


def test_run_plugins_trains_with_an_out_of_tree_adapter(tmp_path, monkeypatch, capsys):
    plugins = write_plugin(tmp_path / "user_code", "my_teacher_a", "inhouse_a")
    monkeypatch.syspath_prepend(str(plugins))
    checkpoint, params = teacher_checkpoint(tmp_path)
    # not named in run.plugins: not imported, so the name fails validation
    unnamed = [f"run.dir={tmp_path / 'unnamed'}", "teacher.adapter=inhouse_a", *small_run()]
    assert main(unnamed) == 2
    assert "teacher.adapter: unknown adapter 'inhouse_a'" in capsys.readouterr().err
    assert "my_teacher_a" not in sys.modules
    metrics = run_with_inhouse_teacher(
        tmp_path / "run",
        "inhouse_a",
        "run.plugins=[my_teacher_a]",
        f"teacher.inhouse.checkpoint={checkpoint}",
    )
    assert "my_teacher_a" in sys.modules
    assert metrics["teacher/params"] == params  # the in-house net, no head on a teacher
    assert metrics["student/teacher_cosine"] > 0.0
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.teacher.adapter == "inhouse_a" and saved.run.plugins == ["my_teacher_a"]


def test_entry_point_plugin_is_imported_only_when_named(tmp_path, monkeypatch):
    """A fake installed distribution declares two entry points; only the named one loads."""
    site = write_plugin(tmp_path / "site", "my_teacher_b", "inhouse_b")
    (site / "never_imported.py").write_text("raise RuntimeError('imported without being named')")
    dist = site / "inhouse_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: inhouse-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[mmkd.adapters]\n"
        "inhouse_b = my_teacher_b:InHouseAdapter\n"
        "unused = never_imported:Adapter\n"
    )
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigError, match=r"x\.adapter: unknown adapter 'nope'.* inhouse_b, "):
        ADAPTERS.get("nope", key="x.adapter")  # listed as valid, not imported
    assert "my_teacher_b" not in sys.modules
    metrics = run_with_inhouse_teacher(tmp_path / "run", "inhouse_b", "run.test=false")
    assert "my_teacher_b" in sys.modules and "never_imported" not in sys.modules
    assert metrics == {}  # run.test=false: trained and exported, nothing to evaluate
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match=r"adapter 'unused' from entry point .*RuntimeError"):
        ADAPTERS.get("unused")


def test_a_plugin_that_cannot_be_imported_is_named(tmp_path, capsys):
    code = main([*small_run(), f"run.dir={tmp_path}", "run.plugins=[no_such_plugin_module]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "run.plugins: cannot import 'no_such_plugin_module' (ModuleNotFoundError" in err


DATASET_PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

from mmkd.data import DatasetSplits, register_dataset
from mmkd.data.demo import CLASS_NAMES, DemoDataset
from mmkd.settings import Settings


@dataclass
class MyShapesCfg(Settings):
    positive: ClassVar = ("size",)
    size: int = 32  # samples per split


@register_dataset("my_shapes", MyShapesCfg, reads=("demo",))
def build(cfg):
    """The demo shapes, sized by the plugin's own data.my_shapes section."""
    size = cfg.my_shapes.size
    return DatasetSplits(
        *(DemoDataset(cfg.demo, split, size, seed=7) for split in ("train", "val", "test")),
        modalities=("image", "audio", "text"),
        class_names=list(CLASS_NAMES),
    )
'''


def test_dataset_plugin_is_selected_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_data_plugin.py").write_text(DATASET_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    overrides = [
        "teacher=none",
        "losses=supervised",
        "data.train_labels=true",
        *tiny_overrides("student", "audio_cnn"),
        "student.head.classifier=true",
        *small_run(),
        "run.plugins=[my_data_plugin]",
        "data.name=my_shapes",
        "data.my_shapes.size=27",
        f"run.dir={run_dir}",
    ]
    assert main(overrides) == 0
    assert OmegaConf.load(run_dir / "config.yaml").data.name == "my_shapes"
    assert "student/accuracy" in json.loads((run_dir / "metrics.json").read_text())
