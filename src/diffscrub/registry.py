"""Name -> class registries for adapters and methods.

Registration refuses duplicates and malformed names; lookup of an unknown name raises a
one-line error listing the known ones, so a typo in ``--method`` or ``--family`` is caught
before any model loads.
"""

from __future__ import annotations

import re
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class Registry(Generic[T]):
    def __init__(self, kind: str, flag: str):
        self.kind, self.flag = kind, flag
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None):
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is omitted."""

        def add(obj: T) -> T:
            if not _NAME.match(name):
                raise ValueError(f"{self.kind} name {name!r} must be lower-case letters, digits, '-' or '_'")
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}: choose {self.flag} from {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()

    def __contains__(self, name: str) -> bool:
        return name in self._items
