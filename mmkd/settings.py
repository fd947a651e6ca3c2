"""What a registered entry's config section is: a dataclass of its settings and its checks.

Datasets (`data.<name>`), adapters (`student.<name>`, see `mmkd.adapters.sections`) and the
config layer share this base. A section declares its checks as data (`positive`,
`non_negative`, `choices`) and the keys that hold file paths (`paths`, made absolute at
start-up); `check` runs them, and a subclass adds cross-field rules by overriding it (calling
`super().check`). The errors name `KEY.field`, where `key` is the section's config path.
"""

from __future__ import annotations

from typing import ClassVar

from omegaconf import DictConfig

from mmkd.errors import ConfigError


class Settings:
    """Base of a section dataclass. Class attributes are not config fields (ClassVar)."""

    positive: ClassVar[tuple[str, ...]] = ()  # fields that must be None or > 0
    non_negative: ClassVar[tuple[str, ...]] = ()  # fields that must be None or >= 0
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}  # field -> allowed values
    paths: ClassVar[tuple[str, ...]] = ()  # fields holding a file or folder path

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        """Raise ConfigError naming `key.field` for a value the type alone does not rule out."""
        check_positive(cfg, key, *cls.positive)
        check_non_negative(cfg, key, *cls.non_negative)
        for name, allowed in cls.choices.items():
            check_choice(cfg, key, name, allowed)


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
