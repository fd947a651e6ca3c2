"""A small name → factory registry (timm's pattern): unknown names raise and list the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mmkd.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects (classes or factories). Duplicate names raise."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, *, key: str | None = None) -> T:
        """Return the object for `name`; `key` (a config path) is named in the error."""
        if name not in self._items:
            where = f"{key}: " if key else ""
            hint = difflib.get_close_matches(str(name), self._items, n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise UnknownNameError(
                f"{where}unknown {self.kind} {name!r}.{suggestion} "
                f"Valid names: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
