"""Plugins: the user's own adapters, datasets and loss terms, selectable by name like the
built-in ones, with their own typed config sections.

Two ways in, both explicit:

- `run.plugins=[my_package.mmkd_plugin]` imports those modules when a config is composed
  (before its schema is assembled from the registries); registering with
  `@ADAPTERS.register("name")`, `@register_dataset("name", Config)` or `@register_term` there
  makes the names usable and their sections (`data.<name>`, `losses.<name>`) typed.
- An installed package declares entry points in the `mmkd.adapters` / `mmkd.datasets` groups;
  `mmkd.registry.Registry` imports one only when a config names it.

Nothing else is imported: a config file cannot run code by itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable

from mmkd.errors import ConfigError


def import_plugins(modules: Iterable[str]) -> None:
    """Import each module named in `run.plugins`; a failure names the module. A module that is
    not installed is also looked for in the current folder (the `mmkd` console script does not
    put it on sys.path, as `python -m` does)."""
    for name in modules:
        top = name.partition(".")[0]
        if importlib.util.find_spec(top) is None and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            importlib.import_module(name)
        except Exception as err:  # the plugin's own error, reported in one line
            raise ConfigError(
                f"run.plugins: cannot import {name!r} ({type(err).__name__}: {err})"
            ) from None
