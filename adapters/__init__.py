"""Modality adapters (installed as `mmkd.adapters`): preprocessing + encoder + projection head.

Importing the package registers the config of every built-in adapter (the sections each reads,
from the light `*_config.py` modules: `ADAPTER_CONFIGS`, `adapter_sections`) and imports no
model library, so the config schema is built without torch, timm, transformers or torchaudio.
Importing a name of the model layer (`from mmkd.adapters import ADAPTERS`) registers the
built-in adapter classes in `ADAPTERS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# the configs of the built-in adapters (light: registration only)
from . import audio_config, crepe_config, image_config, text_config, text_rnn_config  # noqa: F401
from .sections import ADAPTER_CONFIGS, Section, adapter_sections, register_adapter_config

if TYPE_CHECKING:
    from .base import ADAPTERS, Adapter, AdapterOutput, Preprocessor, ProjectionHead
    from .build import build_adapter

_EXPORTS = {
    "ADAPTERS": "base",
    "Adapter": "base",
    "AdapterOutput": "base",
    "Preprocessor": "base",
    "ProjectionHead": "base",
    "build_adapter": "build",
}

__all__ = [
    "ADAPTERS",
    "ADAPTER_CONFIGS",
    "Adapter",
    "AdapterOutput",
    "Preprocessor",
    "ProjectionHead",
    "Section",
    "adapter_sections",
    "build_adapter",
    "register_adapter_config",
    "register_builtins",
]


def register_builtins() -> None:
    """Import the built-in adapter modules, which register their adapters."""
    for module in ("audio", "crepe", "image", "text", "text_rnn"):
        importlib.import_module(f".{module}", __name__)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_builtins()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
