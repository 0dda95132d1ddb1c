"""What the other gateway processes have in flight on each executor, through Redis.

Each process writes its own counts (executor pk -> requests in flight) to a Redis
hash of its own, `optimagpt:inflight:<process>`, when they change (at most every
OPTIMAGPT_SHARED_LOAD_INTERVAL_S) and at least once a second, and reads the other
processes' hashes at the same pace. The hashes expire a few seconds after their
last write, so a process that died stops counting by itself. Nothing of this is
on the request path: the router adds a number it already has. Without REDIS_URL
there is one gateway process and nothing to share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

from django.conf import settings

from . import load

log = logging.getLogger("optimagpt.gateway.routing")

PREFIX = "optimagpt:inflight:"
EXPIRE_S = 5
REFRESH_S = 1.0
REDIS_TIMEOUT_S = 2.0

async def share_forever(*, owner: str, stop: asyncio.Event) -> None:
    """Publish this process's counts and read the others' until `stop` is set."""
    if not settings.REDIS_URL:
        return
    import redis.asyncio as redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=REDIS_TIMEOUT_S,
                                  socket_connect_timeout=REDIS_TIMEOUT_S)
    mine = PREFIX + owner
    interval = settings.OPTIMAGPT_SHARED_LOAD_INTERVAL_S
    written_at = 0.0
    failing = False
    try:
        while not stop.is_set():
            try:
                if load.changed.is_set() or time.monotonic() - written_at >= REFRESH_S:
                    load.changed.clear()
                    counts = {str(pk): n for pk, n in load.mine.items() if n > 0}
                    async with client.pipeline(transaction=True) as pipe:
                        pipe.delete(mine)
                        if counts:
                            pipe.hset(mine, mapping=counts)
                        pipe.expire(mine, EXPIRE_S)
                        await pipe.execute()
                    written_at = time.monotonic()
                others: Counter[int] = Counter()
                async for name in client.scan_iter(match=PREFIX + "*", count=500):
                    name = name.decode()
                    if name == mine:
                        continue
                    counts_of_other: dict[bytes, bytes] = await client.hgetall(name)  # type: ignore[misc] # redis types sync and async clients alike
                    for pk, n in counts_of_other.items():
                        others[int(pk)] += int(n)
                load.others.clear()
                load.others.update(others)
                if failing:
                    log.info("sharing in-flight counts through Redis again")
                    failing = False
            except Exception as exc:  # noqa: BLE001 - Redis away: route on our own counts until it is back
                if not failing:
                    log.warning("could not share in-flight counts through Redis: %s", type(exc).__name__)
                    failing = True
                load.others.clear()
                await asyncio.sleep(REFRESH_S)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.delete(mine), REDIS_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await client.aclose()
