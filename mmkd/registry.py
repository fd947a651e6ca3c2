"""A small name → factory registry (timm's pattern): unknown names raise and list the valid ones.

A registry may also name a Python entry point group (e.g. `mmkd.adapters`): an installed
package that declares `name = "module:object"` in that group makes `name` selectable like a
built-in one. Its module is imported only when `name` is asked for, never at start-up.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from mmkd.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects (classes or factories). Duplicate names raise."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def _entry_points(self) -> dict[str, EntryPoint]:
        if not self.entry_point_group:
            return {}
        return {ep.name: ep for ep in entry_points(group=self.entry_point_group)}

    def _load_entry_point(self, entry: EntryPoint, key: str | None) -> None:
        where = f"{key}: " if key else ""
        try:
            obj = entry.load()  # importing the module may register the name itself
        except Exception as err:  # the plugin's own import error, reported in one line
            raise ConfigError(
                f"{where}{self.kind} {entry.name!r} from entry point {entry.value!r} "
                f"({self.entry_point_group}) failed to load: {type(err).__name__}: {err}"
            ) from None
        self._items.setdefault(entry.name, obj)

    def get(self, name: str, *, key: str | None = None) -> T:
        """Return the object for `name`; `key` (a config path) is named in the error."""
        if name not in self._items:
            plugins = self._entry_points()
            if name in plugins:
                self._load_entry_point(plugins[name], key)
        if name not in self._items:
            where = f"{key}: " if key else ""
            valid = sorted({*self._items, *self._entry_points()})
            hint = difflib.get_close_matches(str(name), valid, n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise UnknownNameError(
                f"{where}unknown {self.kind} {name!r}.{suggestion} Valid names: {', '.join(valid)}"
            )
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
