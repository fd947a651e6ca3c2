"""Shared fixtures: data configs and the real data folder (../shared/data or $MMKD_DATA_ROOT)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from mmkd.config.schema import data_schema

DataCfgFactory = Callable[..., DictConfig]


def shared_data_root() -> Path:
    """$MMKD_DATA_ROOT, else the `shared/data` folder beside the repository."""
    env = os.environ.get("MMKD_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (fsdd/, mnist/); skips the test when it is absent."""
    root = shared_data_root()
    if not ((root / "fsdd" / "recordings").is_dir() and (root / "mnist").is_dir()):
        pytest.skip(f"real data not found at {root} (set MMKD_DATA_ROOT)")
    return root


@pytest.fixture
def data_cfg() -> DataCfgFactory:
    """make(name, **overrides) -> a typed `data` node, e.g. make("fsdd", fsdd={"split": "all"})."""

    def make(name: str = "demo", **overrides: Any) -> DictConfig:
        cfg = OmegaConf.merge(OmegaConf.structured(data_schema(name)), {"name": name, **overrides})
        assert isinstance(cfg, DictConfig)
        return cfg

    return make


class MediaWriter:
    """Writes small real media files under a folder (for decode and manifest tests)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def wav(
        self,
        name: str,
        samples: int = 800,
        channels: int = 1,
        rate: int = 8000,
        subtype: str = "PCM_16",
        wave: np.ndarray | None = None,
    ) -> Path:
        if wave is None:
            t = np.arange(samples) / rate
            tone = 0.5 * np.sin(2 * np.pi * 440 * t)
            wave = np.stack([tone] * channels, axis=1) if channels > 1 else tone
        path = self.path(name)
        sf.write(path, np.asarray(wave, dtype=np.float32), rate, subtype=subtype)
        return path

    def png(self, name: str, size: tuple[int, int] = (12, 10), mode: str = "L") -> Path:
        pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3))
        path = self.path(name)
        Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(path)
        return path

    def raw(self, name: str, data: bytes) -> Path:
        path = self.path(name)
        path.write_bytes(data)
        return path


@pytest.fixture
def media(tmp_path: Path) -> MediaWriter:
    return MediaWriter(tmp_path)


@pytest.fixture(autouse=True)
def decode_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """The decode cache (data.decode_cache=auto by default) writes under a temporary folder."""
    monkeypatch.setenv("MMKD_CACHE_DIR", str(tmp_path_factory.mktemp("mmkd_cache")))


@pytest.fixture(autouse=True)
def no_chosen_workers(monkeypatch) -> None:
    """data.num_workers=null picks 0 workers in tests whatever this (shared, loaded) machine's
    timing says, so runs do not depend on it; tests that want workers set them, and
    tests/test_workers.py checks the real rule."""
    from mmkd.data import workers

    monkeypatch.setattr(workers, "choose_workers", lambda cores, seconds, cuda: 0)
