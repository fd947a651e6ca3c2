"""Checkpoint handling beyond Lightning's defaults: atomic verified saves, safe loading, RNG
state (`ResumeRandomState`), saving on signals.

Saving (`SafeCheckpointIO.save_checkpoint`): the checkpoint is serialised in memory, the free
space of its folder checked against its size, then it is written to a temporary file in the
checkpoint's own folder, fsynced and renamed over the old one, and its sha256 written beside it
(`last.ckpt.sha256`). The previous good checkpoint is kept as `last.ckpt.prev` (a hard link: no
extra space). Lightning's own atomic save writes through a temporary file in the system's temp
folder and copies it across file systems, which leaves a truncated file when the disk fills.

Resuming (`resume_checkpoint`): a checkpoint whose checksum does not match, or that is empty,
truncated or unreadable, is not loaded: the previous good one is, with one line saying so.
Checkpoints are read with `torch.load(weights_only=True)` only; a damaged file is reported by
name. The RNG state travels with the checkpoint, and SIGINT / SIGTERM save one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mmkd.errors import CheckpointError, DiskSpaceError
from mmkd.io import check_free_space

log = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
PREVIOUS_SUFFIX = ".prev"


def checksum_path(path: Path) -> Path:
    """Where the sha256 of checkpoint `path` is kept."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def previous_path(path: Path) -> Path:
    """Where the previous good checkpoint of `path` is kept."""
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def first_sentence(err: BaseException) -> str:
    """The error's type and its first sentence (torch's zip errors run to five sentences)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
    return f"{type(err).__name__}: {text.split('. ')[0].rstrip('.')}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    with contextlib.suppress(OSError):  # some file systems cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to a temporary file beside `path`, fsync it and rename it onto `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` must not be resumed from, or None when it is good: missing, empty,
    a checksum that does not match, or (without a checksum file) unreadable."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    recorded = checksum_path(path)
    if recorded.is_file():
        expected = recorded.read_text().split()[:1]
        if not expected or expected[0] != sha256_file(path):
            return "damaged (its sha256 does not match the one saved with it)"
        return None
    try:  # a checkpoint saved before checksums were kept
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        return f"unreadable ({first_sentence(err)})"
    return None


def resume_checkpoint(last: Path) -> Path:
    """The checkpoint to resume from: `last` when it is good, else the previous good one (one
    warning line says so); CheckpointError when neither is."""
    for stale in last.parent.glob(f".{last.name}.*.tmp"):  # a save that was killed
        stale.unlink(missing_ok=True)
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    previous = previous_path(last)
    fallback = checkpoint_problem(previous)
    if fallback is None:
        log.warning("%s is %s; resuming from the previous checkpoint %s", last, problem, previous)
        return previous
    raise CheckpointError(
        f"{last}: {problem}, and the previous checkpoint {previous} is {fallback}; "
        f"delete {last.parent} to start over, or restore a copy"
    )


class SafeCheckpointIO(TorchCheckpointIO):
    """Saves atomically in the checkpoint's own folder with a checksum beside it, keeping the
    previous good checkpoint; loads with `weights_only=True`, and a truncated or corrupt file
    raises CheckpointError naming it instead of a traceback from deep inside torch."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        check_free_space(path, len(data), "checkpoint")
        digest = hashlib.sha256(data).hexdigest()
        try:
            self.keep_previous(path)
            write_durably(path, data)
            write_durably(checksum_path(path), f"{digest}  {path.name}\n".encode())
            fsync_dir(path.parent)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise DiskSpaceError(
                    f"checkpoint {path}: the disk filled while writing {len(data):,} bytes; "
                    "the previous checkpoint is kept. Free some space and resume "
                    "(run.resume=true)"
                ) from None
            raise CheckpointError(f"checkpoint {path}: cannot be written ({err})") from None

    @staticmethod
    def keep_previous(path: Path) -> None:
        """Hard-link the current checkpoint, if good, as the previous one (with its checksum)."""
        if not path.is_file() or checkpoint_problem(path) is not None:
            return  # a damaged checkpoint never replaces the previous good one
        previous = previous_path(path)
        for source, target in ((path, previous), (checksum_path(path), checksum_path(previous))):
            if not source.is_file():
                checksum_path(previous).unlink(missing_ok=True)
                continue
            link = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            link.unlink(missing_ok=True)
            try:
                os.link(source, link)
            except OSError:  # no hard links on this file system: copy
                shutil.copyfile(source, link)
            os.replace(link, target)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        checksum_path(Path(path)).unlink(missing_ok=True)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such checkpoint")
        if Path(path).stat().st_size == 0:
            raise CheckpointError(f"{path}: empty checkpoint (0 bytes); delete it to start over")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:  # zip / pickle / EOF errors of a damaged file
            raise CheckpointError(
                f"{path}: unreadable checkpoint ({first_sentence(err)}); it may be truncated or "
                "corrupt. Delete it to start over, or restore it from a copy."
            ) from None


def checkpoint_estimate(module: torch.nn.Module) -> int:
    """A checkpoint's likely size in bytes: the weights, plus two optimizer moments per
    trainable parameter (Adam), before the first one is written."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return weights + 2 * trainable


def rng_state() -> dict[str, Any]:
    """Every RNG the training step may draw from, as types `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the torch, numpy, random (and CUDA) generators saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointOnInterrupt(pl.Callback):
    """On Ctrl-C (SIGINT) or SIGTERM, save `path` so that `run.resume=true` continues."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.signal: str | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.signal = "SIGINT"
        elif isinstance(exception, SIGTERMException):
            self.signal = "SIGTERM"
        else:
            return
        trainer.save_checkpoint(self.path)
        log.warning(
            "%s: saved %s (epoch %d, step %d)",
            self.signal,
            self.path,
            trainer.current_epoch,
            trainer.global_step,
        )


class ResumeRandomState(pl.Callback):
    """Saves every RNG's state in each checkpoint (its top-level `mmkd_rng` entry) and restores
    it on resume just before the first training batch: after the data loader has drawn its
    seeds, so the resumed run draws exactly what the interrupted one would have."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["mmkd_rng"] = rng_state()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.pending = checkpoint.get("mmkd_rng")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pending is not None:
            set_rng_state(self.pending)
            self.pending = None
