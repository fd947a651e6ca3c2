"""The `mmkd` command (one entry, subcommands from one table) and user config folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmkd.cli import COMMANDS, main
from mmkd.config import compose
from mmkd.config.compose import default_config_dir
from mmkd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(COMMANDS) == {"train", "evaluate", "export", "pack", "store", "layers"}
    for name, command in COMMANDS.items():
        assert command.usage.startswith(f"mmkd {name}") and command.usage in out


def test_unknown_subcommand_is_refused_with_the_usage(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "mmkd evaluate RUN_DIR" in err


def test_every_subcommand_reports_errors_in_one_line(tmp_path, capsys):
    for argv in (
        ["train", "student.adpter=image"],
        ["evaluate", str(tmp_path)],
        ["export", str(tmp_path)],
        ["layers", "student.features=[nope]"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err)


def test_every_subcommand_answers_help_and_refuses_bad_usage_with_one_parser(tmp_path, capsys):
    for name in COMMANDS:
        assert main([name, "--help"]) == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: mmkd {name} [-h]"), out[:80]
    overrides = {"train", "evaluate", "layers"}  # the commands taking key=value overrides
    assert {n for n in COMMANDS if "key=value" in COMMANDS[n].usage} == overrides
    for argv in (["evaluate"], ["store", "tidy", str(tmp_path)], ["train", "--epochs", "3"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"usage: mmkd {argv[0]}" in err and f"mmkd {argv[0]}: error: " in err, err


def test_import_mmkd_is_light_and_every_public_name_resolves():
    code = (
        "import sys, mmkd; "
        "heavy = [m for m in ('torch', 'numpy', 'omegaconf') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "print(sorted(n for n in mmkd.__all__ if getattr(mmkd, n, None) is None))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    import mmkd
    from mmkd.export import load_exported

    assert set(mmkd.__all__) == {"__version__", *mmkd._EXPORTS}  # the list says what resolves
    assert mmkd.load_exported is load_exported and "compose" in dir(mmkd)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = mmkd.nope


def test_train_py_is_a_shim_for_mmkd_train():
    result = subprocess.run(
        [sys.executable, "train.py", "student.adpter=image"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "student.adpter: Key 'adpter' not in 'AdapterSpec'" in result.stderr


@pytest.fixture
def user_configs(tmp_path: Path) -> Path:
    """A project's own config folder: an experiment, a student, and a replaced mmkd file."""
    folder = tmp_path / "my_configs"
    (folder / "experiment").mkdir(parents=True)
    (folder / "student").mkdir()
    (folder / "losses").mkdir()
    (folder / "experiment" / "mine.yaml").write_text(
        "defaults:\n  student: wide_image\n  losses: bind\ntrainer:\n  max_epochs: 3\n"
    )
    (folder / "student" / "wide_image.yaml").write_text(
        "adapter: image\ntimm:\n  model: resnet10t\nimage:\n  img_size: 48\n"
    )
    (folder / "losses" / "bind.yaml").write_text("contrastive:\n  weight: 0.25\n")
    return folder


def test_user_config_folder_is_searched_before_mmkds(user_configs, monkeypatch):
    monkeypatch.chdir(user_configs.parent)
    cfg = compose(["run.config_path=my_configs", "experiment=mine"])
    assert cfg.run.name == "mine" and cfg.trainer.max_epochs == 3
    assert cfg.student.image.img_size == 48  # the user's student group file
    assert cfg.losses.contrastive.weight == 0.25  # the user's losses/bind.yaml replaced mmkd's
    assert cfg.losses.embed.weight == 0.0  # ... entirely: mmkd's bind.yaml was not merged
    assert cfg.trainer.accelerator == "cpu" and cfg.data.batch_size == 64  # mmkd's own groups
    assert cfg.run.config_path == str(user_configs)  # saved absolute for later evaluation
    # without the folder, mmkd's own groups only
    assert compose(["experiment=demo_bind"]).losses.embed.weight == 1.0


def test_unknown_names_list_the_choices_of_both_folders(user_configs):
    with pytest.raises(ConfigError, match=r"student=nope: .*Available: .*tiny_image.*wide_image"):
        compose([f"run.config_path={user_configs}", "student=nope"])
    with pytest.raises(ConfigError, match=r"run.config_path: .* is not a folder"):
        compose([f"run.config_path={user_configs / 'missing'}"])


def test_mmkds_configs_are_found_without_a_checkout_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing relative to the current folder
    assert (default_config_dir() / "config.yaml").is_file()
    assert compose([]).run.name == "demo_bind"
