"""Eviction policies behind one interface. memd asks a policy for a victim among the evictable residents."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Protocol

Key = tuple[int, int]  # (MoE layer, expert)


class EvictionPolicy(Protocol):
    name: str

    def on_insert(self, key: Key) -> None: ...

    def on_access(self, key: Key) -> None: ...

    def on_remove(self, key: Key) -> None: ...

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """The resident key to evict next among those ``evictable`` allows, or None when none is."""


class LruPolicy:
    """Least recently used: the resident expert acquired longest ago goes first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        return next((k for k in self._order if evictable(k)), None)


POLICIES = {"lru": LruPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
