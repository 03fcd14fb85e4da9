"""Named choices (samplers, scorers): one lookup, one error naming the argument and what is allowed."""
from __future__ import annotations

from typing import Dict, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries chosen by name through the argument ``argument`` (e.g. ``sampler=``)."""

    def __init__(self, argument: str, entries: Dict[str, T]):
        self.argument = argument
        self._entries = dict(entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry ``name``; a ValueError naming the argument lists the allowed names otherwise."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"{self.argument} must be one of {self.names()}, got {name!r}")
        return self._entries[name]

    def add(self, name: str, entry: T) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"a {self.argument} named {name!r} is already registered")
        self._entries[name] = entry
