"""Modality adapters (installed as `mmkd.adapters`): preprocessing + encoder + projection head.

Importing a name of this package (`from mmkd.adapters import ADAPTERS`) registers the built-in
adapters in `ADAPTERS`. Importing the package alone imports no model library, so the light
config sections beside each adapter (`*_config.py`, `sections.py`) can be read by the config
schema without torch, timm, transformers or torchaudio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    "Adapter",
    "AdapterOutput",
    "Preprocessor",
    "ProjectionHead",
    "build_adapter",
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
