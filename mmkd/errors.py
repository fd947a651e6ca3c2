"""Exceptions with messages meant for people: each names the config key, file or sample at fault."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class MMKDError(Exception):
    """Base class for errors mmkd reports to the user without a traceback."""


class ConfigError(MMKDError):
    """A config value is unknown, mistyped, out of range or inconsistent with another one."""


class DataError(MMKDError):
    """A sample, file or manifest row cannot be used; the message says which one and why."""


class CheckpointError(MMKDError):
    """A checkpoint, export or cache file is missing, truncated or does not match the run."""


class DiskSpaceError(MMKDError):
    """A disk has less free space than a file about to be written needs."""


class SettingError(ConfigError):
    """A setting is wrong, as the code that reads it sees it: `field` is the setting's path
    relative to the section that code was given (`timm.model`, `folder.train`, `pairs[0]`).
    Only the config layer knows where that section sits in a run's config: the code that built
    the component from it names the full key with `settings_at` (`student.timm.model: ...`).
    Unmapped, it still reads as a ConfigError naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def at(self, key: str) -> ConfigError:
        """The same error naming the full config key: `key` is the section's config path."""
        return ConfigError(f"{key}.{self.field}: {self.message}" if key else str(self))


@contextmanager
def settings_at(key: str) -> Iterator[None]:
    """Within it, a `SettingError` of the component being built from the section at config key
    `key` becomes a ConfigError naming `key.field`."""
    try:
        yield
    except SettingError as err:
        raise err.at(key) from None
