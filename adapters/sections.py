"""What an adapter's config sections are, and which adapter reads which: a light registry.

A section is a dataclass of settings (`Section`: the checks of `Settings` plus the export
hooks). Each adapter family declares its sections in a light `*_config.py` beside its code (no
torch, timm, transformers or torchaudio) and registers, for every adapter name, the sections
that adapter reads: `register_adapter_config("audio_cnn", audio=AudioCfg, cnn=AudioCnnCfg)`.
The config layer builds each model's spec from these (`mmkd.config.schema.adapter_schema`), so
a spec holds only its adapter's sections. A plugin adapter registers its own the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mmkd.errors import ConfigError
from mmkd.registry import Registry
from mmkd.settings import Settings, check_choice, check_non_negative, check_positive

__all__ = [
    "ADAPTER_CONFIGS",
    "AdapterConfig",
    "Section",
    "adapter_sections",
    "check_choice",
    "check_non_negative",
    "check_positive",
    "register_adapter_config",
    "section_names",
]


class Section(Settings):
    """Base of an adapter's section dataclass (`student.<name>`): the checks of `Settings`
    (run at start-up on every section of a spec) plus the export hooks. Subclasses override
    the hooks they need."""

    @classmethod
    def exported(cls, cfg: DictConfig) -> None:
        """Edit `cfg` in place for an export: switch off pretrained sources (the exported
        weights file holds the weights)."""

    @classmethod
    def from_export(cls, cfg: DictConfig, folder: Path) -> None:
        """Edit `cfg` in place after loading it from the exported model folder `folder` (make
        the paths of assets saved there absolute)."""


@dataclass(frozen=True)
class AdapterConfig:
    """The config of a registered adapter: section name -> `Section` dataclass it reads."""

    name: str
    sections: dict[str, type[Section]]


# the same entry point group as the adapter classes: naming an installed plugin's adapter imports
# its module, which registers its config here (and its class in mmkd.adapters.ADAPTERS)
ADAPTER_CONFIGS: Registry[AdapterConfig] = Registry("adapter", entry_point_group="mmkd.adapters")

#: the fields every spec has besides its adapter's sections (mmkd.config.schema.AdapterSpec)
COMMON_FIELDS = ("adapter", "weights", "freeze_encoder", "features", "head")


def register_adapter_config(name: str, **sections: type[Section]) -> None:
    """Declare the sections adapter `name` reads (`student.<section>` for each keyword), in
    the order a spec and an export list them. Call it beside the `ADAPTERS.register(name)` of
    the adapter class (a built-in does it in its light `*_config.py`)."""
    for section, cls in sections.items():
        if section in COMMON_FIELDS or not (isinstance(cls, type) and issubclass(cls, Section)):
            raise ValueError(
                f"adapter {name!r}: section {section!r} must be a Section dataclass whose name "
                f"is not one of {', '.join(COMMON_FIELDS)}"
            )
    ADAPTER_CONFIGS.register(name)(AdapterConfig(name, dict(sections)))


def adapter_sections(name: str, key: str = "student.adapter") -> dict[str, type[Section]]:
    """Section name -> dataclass of every section adapter `name` reads (ConfigError at `key`
    listing the valid names for an unknown adapter)."""
    if name not in ADAPTER_CONFIGS:
        base = sys.modules.get("mmkd.adapters.base")  # loaded only where adapters are built
        if base is not None and name in base.ADAPTERS:
            raise ConfigError(
                f"{key}: adapter {name!r} declares no config sections; its module must call "
                f"mmkd.adapters.register_adapter_config({name!r}, ...) (with no sections if "
                "it reads none)"
            )
    entry = ADAPTER_CONFIGS.get(name, key=key)
    if not isinstance(entry, AdapterConfig):  # an entry point whose module registered no config
        raise ConfigError(
            f"{key}: adapter {name!r} (an installed plugin) declares no config sections; its "
            f"module must call mmkd.adapters.register_adapter_config({name!r}, ...)"
        )
    return dict(entry.sections)


def section_names() -> dict[str, tuple[str, ...]]:
    """Section name -> the registered adapters that read it (e.g. timm: audio_timm, image)."""
    readers: dict[str, list[str]] = {}
    for name in ADAPTER_CONFIGS:
        entry = ADAPTER_CONFIGS.get(name)
        if isinstance(entry, AdapterConfig):
            for section in entry.sections:
                readers.setdefault(section, []).append(name)
    return {section: tuple(names) for section, names in readers.items()}
