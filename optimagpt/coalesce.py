"""One load for many waiters: concurrent cache misses for the same key share a single database query.

The gateway caches what every API request needs (the API key, the executors that can serve a model).
When such an entry is missing or has just expired, every request arriving before the first load
finishes would otherwise run the same query, one after another on the single database thread
(bench/README.md, "Measurements behind the code").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalesced(Generic[T]):
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[T]] = {}

    async def load(self, key: Hashable, loader: Callable[[], Awaitable[T]]) -> T:
        """The result of `loader()`, run once for all callers that ask for `key` while it runs.

        A caller that is cancelled stops waiting; the load goes on for the others.
        """
        running = self._running.get(key)
        if running is None or running.get_loop() is not asyncio.get_running_loop():
            running = asyncio.ensure_future(loader())
            self._running[key] = running
            running.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(running)

    def _forget(self, key: Hashable, done: asyncio.Future[T]) -> None:
        if self._running.get(key) is done:
            del self._running[key]

    def clear(self) -> None:
        """Later callers start a fresh load (what is running may have read what has just changed)."""
        self._running.clear()
