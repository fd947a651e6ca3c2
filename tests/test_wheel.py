"""The built wheel works anywhere: installed into a fresh virtual environment, `mmkd train`
runs the default experiment (one epoch) from an empty folder, with the config groups shipped
inside the wheel.

To stay offline and quick, the fresh environment gets only the wheel (`--no-deps`); a .pth file
lends it this environment's site-packages for torch and the other dependencies. The mmkd
package itself, its configs and its console script come from the wheel (checked below).
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("mmkd", "adapters", "configs", "pyproject.toml", "README.md")


def sh(*args: str | Path, cwd: Path, timeout: int = 600) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def build_wheel(tmp: Path) -> Path:
    """`pip wheel` of a copy of the sources (keeps build/ out of the checkout)."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    pip_wheel = ["-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q"]
    sh(sys.executable, *pip_wheel, "-w", tmp / "dist", cwd=tmp)
    (wheel,) = (tmp / "dist").glob("mmkd-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    sh(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "-q",
        wheel,
        cwd=tmp,
    )
    (venv_site,) = (venv / "lib").glob("python*/site-packages")
    (venv_site / "_mmkd_test_dependencies.pth").write_text("\n".join(site.getsitepackages()))
    return venv


@pytest.mark.slow
def test_wheel_installs_and_trains_from_an_empty_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mmkd/configs/")}
    configs = ROOT / "configs"
    expected = {f"mmkd/configs/{p.relative_to(configs)}" for p in configs.glob("**/*.yaml")}
    assert shipped == expected  # every config group file, nothing else

    venv = fresh_venv(tmp_path, wheel)
    work = tmp_path / "empty"
    work.mkdir()
    where = sh(venv / "bin" / "python", "-c", "import mmkd; print(mmkd.__file__)", cwd=work)
    assert where.strip().startswith(str(venv))  # the wheel's mmkd, not this checkout's
    assert "mmkd train" in sh(venv / "bin" / "mmkd", "--help", cwd=work)  # the console script

    mmkd = venv / "bin" / "mmkd"
    quick = ["trainer.enable_progress_bar=false", "run.latency_seconds=0.05"]
    out = sh(mmkd, "train", "trainer.max_epochs=1", *quick, cwd=work)
    assert "teacher/student" in out
    (run_dir,) = (work / "runs").glob("demo_bind-*")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["student/accuracy"] > 1 / 9  # 9 classes: one epoch is already above chance
    assert (run_dir / "logs" / "metrics.csv").is_file()

    evaluated = sh(mmkd, "evaluate", run_dir.relative_to(work), "data.demo.num_test=45", cwd=work)
    assert "student/accuracy" in json.loads(evaluated.strip().splitlines()[-1])
    exported = sh(mmkd, "export", run_dir, "--format", "torchscript", cwd=work)
    assert Path(exported.strip()).is_file()
