"""What an adapter's config section is: a dataclass of its settings, its checks, its export rule.

Each adapter family keeps its section(s) in a light `*_config.py` beside its code (no torch,
timm, transformers or torchaudio), so the schema (`mmkd.config.schema.AdapterSpec`) is built
from them without importing any model library. An adapter class names the sections it reads
(`Adapter.sections`); start-up validation checks those and rejects changes to the others, and
an export writes only those, each passed through its own `exported` rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmkd.errors import ConfigError


class Section:
    """Base of a section dataclass (`student.<name>`). Subclasses override the hooks they need."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        """Raise ConfigError naming `key.field` for a value the type alone does not rule out.
        Run at start-up for the sections the chosen adapter reads."""

    @classmethod
    def exported(cls, cfg: DictConfig) -> None:
        """Edit `cfg` in place for an export: switch off pretrained sources (the exported
        weights file holds the weights)."""

    @classmethod
    def from_export(cls, cfg: DictConfig, folder: Path) -> None:
        """Edit `cfg` in place after loading it from the exported model folder `folder` (make
        the paths of assets saved there absolute)."""

    @classmethod
    def changed(cls, cfg: DictConfig, composed: DictConfig | None = None) -> list[str]:
        """The fields of `cfg` that differ from this section's defaults. A value an export
        writes for an untouched section (a default with its pretrained switches off, as earlier
        exports saved every section) counts as a default, and so does the value of `composed`
        (the section as the config group files gave it, before the experiment body and the
        command line)."""
        defaults = OmegaConf.structured(cls)
        exported = defaults.copy()
        cls.exported(exported)
        given, plain, off = _plain(cfg), _plain(defaults), _plain(exported)
        base = _plain(composed) if composed is not None else {}
        return [
            name
            for name, value in given.items()
            if value not in (plain.get(name), off.get(name))
            and (name not in base or value != base[name])
        ]


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """`cfg` as a dict, interpolations resolved where they can be (else left as written)."""
    try:
        out = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. a resolver that is not registered in this process
        out = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(out, dict)
    return out


def check_positive(cfg: DictConfig, key: str, *names: str) -> None:
    """ConfigError unless each of `names` is None or > 0."""
    for name in names:
        value = cfg[name]
        if value is not None and not value > 0:
            raise ConfigError(f"{key}.{name}: must be > 0, got {value}")


def check_non_negative(cfg: DictConfig, key: str, *names: str) -> None:
    """ConfigError unless each of `names` is None or >= 0."""
    for name in names:
        value = cfg[name]
        if value is not None and not value >= 0:
            raise ConfigError(f"{key}.{name}: must be >= 0, got {value}")


def check_choice(cfg: DictConfig, key: str, name: str, allowed: tuple[str, ...]) -> None:
    """ConfigError unless `name` is one of `allowed`."""
    if cfg[name] not in allowed:
        raise ConfigError(f"{key}.{name}: {cfg[name]!r} is not one of {', '.join(allowed)}")
