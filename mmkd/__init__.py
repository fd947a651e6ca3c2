"""mmkd: train compact cross-modal students from frozen image, text and audio teachers.

The public API, importable from here (each name is imported on first use, so `import mmkd`
loads no model library):

- run: `compose` (overrides -> validated-ready config), `validate`; training itself is
  `mmkd.train.train(cfg)` and evaluation `mmkd.evaluate.evaluate_models` (the submodules' names
  are taken, so those two are not re-exported here);
- exported models: `load_exported` -> `ExportedModel`, `export_model`;
- extension points (registries and what they hold): `ADAPTERS`, `Adapter`, `build_adapter`;
  `DATASETS`, `DatasetSplits`; `TERMS`, `LossTerm`, `register_term`;
- the teacher store: `TeacherStore`, `StoreSpec`;
- errors: `MMKDError` and its kinds `ConfigError`, `DataError`, `CheckpointError`,
  `DiskSpaceError`; `SettingError`, the ConfigError a component raises naming the field of
  its own settings (the code that built it from the config names the full key).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mmkd.adapters import ADAPTERS, Adapter, build_adapter
    from mmkd.config import compose, validate
    from mmkd.data import DATASETS, DatasetSplits
    from mmkd.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        DiskSpaceError,
        MMKDError,
        SettingError,
    )
    from mmkd.export import ExportedModel, export_model, load_exported
    from mmkd.losses import TERMS, LossTerm, register_term
    from mmkd.store import StoreSpec, TeacherStore

_EXPORTS = {  # name -> the module it is imported from on first use
    "compose": "mmkd.config",
    "validate": "mmkd.config",
    "load_exported": "mmkd.export",
    "ExportedModel": "mmkd.export",
    "export_model": "mmkd.export",
    "ADAPTERS": "mmkd.adapters",
    "Adapter": "mmkd.adapters",
    "build_adapter": "mmkd.adapters",
    "DATASETS": "mmkd.data",
    "DatasetSplits": "mmkd.data",
    "TERMS": "mmkd.losses",
    "LossTerm": "mmkd.losses",
    "register_term": "mmkd.losses",
    "TeacherStore": "mmkd.store",
    "StoreSpec": "mmkd.store",
    "MMKDError": "mmkd.errors",
    "ConfigError": "mmkd.errors",
    "DataError": "mmkd.errors",
    "CheckpointError": "mmkd.errors",
    "DiskSpaceError": "mmkd.errors",
    "SettingError": "mmkd.errors",
}

__all__ = [  # the names of _EXPORTS, spelled out for tools that read __all__ statically
    "ADAPTERS",
    "DATASETS",
    "TERMS",
    "Adapter",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DatasetSplits",
    "DiskSpaceError",
    "ExportedModel",
    "LossTerm",
    "MMKDError",
    "SettingError",
    "StoreSpec",
    "TeacherStore",
    "__version__",
    "build_adapter",
    "compose",
    "export_model",
    "load_exported",
    "register_term",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
