"""A small in-process cache: entries that expire, loads shared by concurrent misses, and a generation counter.

The gateway keeps what every API request needs in memory (verified API keys, JWT users, the executors that
can serve a model): a database query costs a thread hop per request. A change forgets entries at once
(`forget`, `forget_where`, `clear`) and bumps the generation, so a load that began before the change, and
may have read the old row, is returned to its callers but not kept.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from .coalesce import Coalesced

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    def __init__(self, lifetime_s: Callable[[], float]) -> None:
        """`lifetime_s()` is read at each store, so a changed setting holds from the next entry on."""
        self._lifetime_s = lifetime_s
        self._entries: dict[K, tuple[float, V]] = {}
        self._loads: Coalesced[V] = Coalesced()
        self.generation = 0

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (time.monotonic() + self._lifetime_s(), value)

    async def get_or_load(self, key: K, loader: Callable[[], Awaitable[V]],
                          keep: Callable[[V], bool] = lambda value: True) -> V:
        """The entry, or `loader()`'s result (one load for all who miss at once), kept if `keep` says so and
        nothing changed while it ran; a load whose result is not kept forgets the entry."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]

        async def load() -> V:
            generation = self.generation
            value = await loader()
            if not keep(value):
                self._entries.pop(key, None)
            elif generation == self.generation:
                self.put(key, value)
            return value

        return await self._loads.load(key, load)

    def _changed(self) -> None:
        self.generation += 1
        self._loads.clear()

    def forget(self, key: K) -> None:
        self._changed()
        self._entries.pop(key, None)

    def forget_where(self, matches: Callable[[K, V], bool]) -> None:
        self._changed()
        for key in [key for key, (_, value) in self._entries.items() if matches(key, value)]:
            self._entries.pop(key, None)

    def clear(self) -> None:
        self._changed()
        self._entries.clear()
