"""Modality adapters (installed as `mmkd.adapters`): preprocessing + encoder + projection head.

Importing this package registers the built-in adapters in `ADAPTERS`.
"""

from . import audio, image, text  # noqa: F401  (registration)
from .base import ADAPTERS, Adapter, AdapterOutput, Preprocessor, ProjectionHead
from .build import build_adapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterOutput",
    "Preprocessor",
    "ProjectionHead",
    "build_adapter",
]
