"""The counters behind rate limits, budgets and the login throttle: in-process, and in real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from accounts.ratelimit import MemoryCounter, RedisCounter
from tests.conftest import require_service


@pytest.fixture(params=["memory", "redis"])
def counter(request):
    if request.param == "memory":
        return MemoryCounter()
    return RedisCounter(require_service("OPTIMAGPT_TEST_REDIS_URL"))


async def test_counts_add_up_within_their_window_and_then_start_again(counter) -> None:
    key = f"test:{uuid.uuid4().hex}"
    assert await counter.get(key) == 0
    assert await counter.add(key, 3, 1) == 3
    assert await counter.add(key, 2, 1) == 5
    assert 1 <= await counter.ttl(key) <= 2
    await asyncio.sleep(1.6)
    assert await counter.get(key) == 0
    assert await counter.add(key, 1, 60) == 1
    await counter.clear(key)
    assert await counter.get(key) == 0


async def test_two_gateway_processes_share_redis_counts() -> None:
    url = require_service("OPTIMAGPT_TEST_REDIS_URL")
    first, second = RedisCounter(url), RedisCounter(url)
    key = f"test:{uuid.uuid4().hex}"
    await first.add(key, 2, 60)
    assert await second.add(key, 1, 60) == 3
    await first.clear(key)
