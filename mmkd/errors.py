"""Exceptions with messages meant for people: each names the config key, file or sample at fault."""


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
