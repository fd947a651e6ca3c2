"""Issue 14 findings 19, 25, 27: export without its extra, a killed export, file modes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import tiny_spec

from mmkd.adapters import build_adapter
from mmkd.cli import run_command
from mmkd.export import export_model, load_exported

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def exported(tmp_path) -> Path:
    export_model(build_adapter(tiny_spec("image"), key="student"), tmp_path / "student")
    return tmp_path


def test_onnx_export_without_the_extra_names_it_in_one_line(exported, monkeypatch, capsys):
    """Finding 19: a 32-line traceback instead of a line naming the [export] extra."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    assert run_command("export", [str(exported), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mmkd[export]" in err[0] and "'onnx'" in err[0], err
    assert not (exported / "student" / "model.onnx").exists()


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from tiny import tiny_spec
    import mmkd.export as export
    from mmkd.adapters import build_adapter
    real = export.save_state
    def dying(path, state):
        real(path, state)
        os.kill(os.getpid(), signal.SIGKILL)
    export.save_state = dying
    export.export_model(build_adapter(tiny_spec("image"), key="student"), sys.argv[1])
""")


@pytest.mark.slow
def test_a_killed_export_leaves_no_temporary_folder(exported):
    """Finding 25: SIGKILL during export left .student.*.tmp beside the export for good."""
    target = exported / "student"
    before = (target / "model.safetensors").read_bytes()
    code = KILLED.format(tests=str(ROOT / "tests"))
    killed = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert list(exported.glob(".student.*"))  # what the killed export left
    assert (target / "model.safetensors").read_bytes() == before  # the old export is whole
    export_model(build_adapter(tiny_spec("image"), key="student"), target)
    assert not list(exported.glob(".student.*"))
    load_exported(target)


def test_exported_files_follow_the_umask(tmp_path):
    """Finding 27: model.safetensors came out mode 0600 whatever the umask."""
    old = os.umask(0o022)
    try:
        folder = export_model(build_adapter(tiny_spec("image"), key="s"), tmp_path / "student")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes


def test_flipped_bytes_in_exported_weights_are_refused(exported):
    """Found by benchmarks/faults.py: safetensors has no checksum, so flipped weight bytes
    loaded silently; meta.json now records each file's sha256 and every load checks it."""
    from mmkd.errors import CheckpointError

    weights = exported / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-20:-10] = bytes(b ^ 0xFF for b in data[-20:-10])
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: damaged or missing"):
        load_exported(exported / "student")
