"""Batching usage accounting off the request path.

Each finished request adds its tokens to an in-process buffer; at most every
OPTIMAGPT_USAGE_FLUSH_S seconds one Celery task (in-process in the embedded
default) writes the sums. A database write per request would cost a thread
hop and a write on every call. `python -m optimagpt.server` flushes what is
left when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from accounts.tasks import usage_record
from accounts.usage import UsageRow

log = logging.getLogger("optimagpt.usage")

_pending: dict[tuple[str, int | None, int | None], list[int]] = {}
_last_flush = 0.0
_flushing: asyncio.Task[None] | None = None


def usage_add(*, api_key_id: int | None, user_id: int | None, usage: dict[str, Any]) -> None:
    global _flushing
    day = datetime.now(UTC).date().isoformat()
    sums = _pending.setdefault((day, api_key_id, user_id), [0, 0, 0])
    sums[0] += 1
    sums[1] += int(usage.get("prompt_tokens") or 0)
    sums[2] += int(usage.get("completion_tokens") or 0)
    if time.monotonic() - _last_flush >= settings.OPTIMAGPT_USAGE_FLUSH_S and (_flushing is None or _flushing.done()):
        _flushing = asyncio.get_running_loop().create_task(_flush())


def _take() -> list[UsageRow]:
    global _pending, _last_flush
    pending, _pending = _pending, {}
    _last_flush = time.monotonic()
    return [UsageRow(day=day, api_key_id=key_id, user_id=user_id, requests=r, prompt_tokens=p, completion_tokens=c)
            for (day, key_id, user_id), (r, p, c) in pending.items()]


async def _flush() -> None:
    rows = _take()
    if rows:
        try:
            await database_sync_to_async(usage_record.delay)(rows)
        except Exception:
            log.exception("could not record usage of %d rows", len(rows))


def usage_flush_sync() -> None:
    """Write what is buffered now (at shutdown, when no event loop runs any more)."""
    rows = _take()
    if rows:
        usage_record.delay(rows)
