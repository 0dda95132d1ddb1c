"""Counters in fixed time windows, for rate limits, token budgets and the login throttle.

In-process by default; with REDIS_URL set, in Redis, so that every gateway process
counts against the same limits. Both are async-native: no thread hop on the API path.
"""

from __future__ import annotations

import time
from typing import Protocol

from django.conf import settings

from optimagpt.addresses import address_block
from optimagpt.errors import RateLimited

REDIS_TIMEOUT_S = 2.0


class Counter(Protocol):
    async def get(self, key: str) -> int: ...
    async def add(self, key: str, amount: int, window_s: int) -> int: ...
    async def ttl(self, key: str) -> int: ...
    async def clear(self, key: str) -> None: ...


class MemoryCounter:
    """Counts for one gateway process (the embedded default)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[float, int]] = {}

    def _live(self, key: str) -> tuple[float, int] | None:
        entry = self._counts.get(key)
        if entry is not None and entry[0] <= time.monotonic():
            del self._counts[key]
            return None
        return entry

    async def get(self, key: str) -> int:
        entry = self._live(key)
        return entry[1] if entry else 0

    async def add(self, key: str, amount: int, window_s: int) -> int:
        entry = self._live(key)
        expires, value = entry if entry else (time.monotonic() + window_s, 0)
        self._counts[key] = (expires, value + amount)
        if len(self._counts) > 100_000:  # a flood of distinct keys must not grow memory without end
            now = time.monotonic()
            self._counts = {k: v for k, v in self._counts.items() if v[0] > now}
        return value + amount

    async def ttl(self, key: str) -> int:
        entry = self._live(key)
        return max(1, int(entry[0] - time.monotonic()) + 1) if entry else 0

    async def clear(self, key: str) -> None:
        self._counts.pop(key, None)


class RedisCounter:
    """Counts shared by every gateway process that uses the same Redis."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                           socket_connect_timeout=REDIS_TIMEOUT_S)

    @staticmethod
    def _key(key: str) -> str:
        return f"optimagpt:count:{key}"

    async def get(self, key: str) -> int:
        return int(await self._redis.get(self._key(key)) or 0)

    async def add(self, key: str, amount: int, window_s: int) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(self._key(key), amount)
            pipe.expire(self._key(key), window_s, nx=True)  # the window starts with its first count
            value, _ = await pipe.execute()
        return int(value)

    async def ttl(self, key: str) -> int:
        return max(0, int(await self._redis.ttl(self._key(key))))

    async def clear(self, key: str) -> None:
        await self._redis.delete(self._key(key))


_counter: Counter | None = None


def counter() -> Counter:
    global _counter
    if _counter is None:
        _counter = RedisCounter(settings.REDIS_URL) if settings.REDIS_URL else MemoryCounter()
    return _counter


def _login_limits(address: str, username: str) -> list[tuple[str, int]]:
    """The counters a failed login adds to, with their limits: the address with this username, and the address.

    None of them is the account's alone: a throttle per username would let anyone lock its owner out.
    """
    block = address_block(address)
    failures = settings.OPTIMAGPT_LOGIN_FAILURES
    return [(f"login:pair:{block}:{username.lower()[:150]}", failures), (f"login:addr:{block}", 4 * failures)]


async def login_retry_after(*, address: str, username: str) -> int:
    """Seconds until this address may try this username again; 0 when not throttled."""
    for key, limit in _login_limits(address, username):
        if await counter().get(key) >= limit:
            return max(1, await counter().ttl(key))
    return 0


async def login_failed(*, address: str, username: str) -> None:
    for key, _ in _login_limits(address, username):
        await counter().add(key, 1, settings.OPTIMAGPT_LOGIN_WINDOW_S)


# -- per client address (the API) ----------------------------------------------------------------------
ADDRESS_WINDOW_S = 60


async def address_admit(address: str) -> None:
    """OPTIMAGPT_IP_REQUESTS_PER_MINUTE, when set: the address's API requests this minute. Raises RateLimited."""
    limit = settings.OPTIMAGPT_IP_REQUESTS_PER_MINUTE
    if not limit:
        return
    key = f"ip:requests:{address_block(address)}"
    if await counter().add(key, 1, ADDRESS_WINDOW_S) > limit:
        retry = max(1, await counter().ttl(key))
        raise RateLimited(f"Too many requests from this address: {limit} a minute; try again in {retry} s.",
                          retry_after=retry, code="address_rate_limit_exceeded")


async def authentication_failed(address: str) -> None:
    """Count a failed authentication of the address; past OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE raises RateLimited.

    Only unauthenticated attempts are refused so: a valid key from the same (office) address still passes.
    """
    limit = settings.OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE
    key = f"ip:auth-failures:{address_block(address)}"
    if await counter().add(key, 1, ADDRESS_WINDOW_S) > limit:
        retry = max(1, await counter().ttl(key))
        raise RateLimited(f"Too many failed authentications from this address; try again in {retry} s.",
                          retry_after=retry, code="too_many_authentication_failures")
