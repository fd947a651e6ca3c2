"""Reading the files configs and manifests name: audio, images and data folders.

Every failure is a `DataError` (bad file) or `ConfigError` (bad config path) whose message names
the file, so no traceback from soundfile or PIL reaches the user. Audio is returned as stored:
downmixing and resampling belong to the audio adapter, where they are configurable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
from PIL import Image

from mmkd.data.base import DataSettings
from mmkd.errors import ConfigError, DataError

PathLike = str | os.PathLike


def check_file(path: PathLike, kind: str) -> Path:
    """`path` as a Path, after checking it is a non-empty regular file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{kind} file {path} not found") from None
    except OSError as err:
        raise DataError(f"{kind} file {path} cannot be read: {err.strerror or err}") from None
    except ValueError as err:  # e.g. a NUL character in the path
        raise DataError(f"{kind} file {str(path)!r} is not a valid path: {err}") from None
    if not path.is_file():
        raise DataError(f"{kind} file {path} is not a regular file")
    if size == 0:
        raise DataError(f"{kind} file {path} is empty (0 bytes)")
    return path


def read_audio(path: PathLike) -> tuple[np.ndarray, int]:
    """(float32 waveform shaped (samples,) or (samples, channels), sample rate)."""
    path = check_file(path, "audio")
    return decode_audio(path, f"audio file {path}")


def decode_audio(source: PathLike | BinaryIO, name: str) -> tuple[np.ndarray, int]:
    """Decode audio from a path or a file object (e.g. a shard member); errors start with `name`."""
    try:
        wave, rate = sf.read(source, dtype="float32", always_2d=False)
    except Exception as err:  # libsndfile reports corrupt and unknown formats in many ways
        raise DataError(f"{name} cannot be decoded: {err}") from err
    if wave.shape[0] == 0:
        raise DataError(f"{name} has no samples")
    if not np.isfinite(wave).all():
        raise DataError(f"{name} contains NaN or Inf samples")
    return wave, int(rate)


def read_image(path: PathLike) -> Image.Image:
    """The decoded image (pixels loaded, file closed)."""
    path = check_file(path, "image")
    return decode_image(path, f"image file {path}")


def decode_image(source: PathLike | BinaryIO, name: str) -> Image.Image:
    """Decode an image from a path or a file object; errors start with `name`."""
    try:
        with Image.open(source) as image:
            image.load()
    except Exception as err:  # unidentified, truncated, decompression bomb, ...
        raise DataError(f"{name} cannot be decoded: {err}") from err
    return image


def data_folder(cfg: DataSettings, name: str, under_root: str) -> Path:
    """The folder of dataset `name`: `data.NAME.root`, else `data.root/under_root`.

    Raises ConfigError naming the key that gave the path when it is unset or not a folder.
    """
    own = getattr(cfg, name).root
    if own is not None:
        key, folder = f"data.{name}.root", Path(own).expanduser()
    elif cfg.root is not None:
        key, folder = "data.root", Path(cfg.root).expanduser() / under_root
    else:
        raise ConfigError(
            f"data.{name}.root: not set, and data.root (the shared data folder, "
            f"read as ROOT/{under_root}) is not set either"
        )
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise ConfigError(f"{key}: folder {folder} {what}")
    return folder
