"""Clients of the Redis that gateway processes share (REDIS_URL), for the operations stores: one pooled,
thread-safe synchronous client per process for the pages' reads, and asynchronous clients for the loops that
push into it (each loop keeps its own for as long as it runs)."""

from __future__ import annotations

from functools import cache

import redis
import redis.asyncio
from django.conf import settings

TIMEOUT_S = 2.0


@cache
def sync_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)


def async_client(timeout_s: float = TIMEOUT_S) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=timeout_s,
                                        socket_connect_timeout=timeout_s)
