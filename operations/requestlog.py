"""The request log: every API request's figures, written in batches off the request path.

A finished request becomes one tuple in this process's buffer (a finisher of operations/record.py);
a loop writes the buffer every OPTIMAGPT_REQUEST_LOG_FLUSH_S in one bulk INSERT, in a thread, and what
is left when the gateway stops. Prompts and replies are never kept: the record holds none. The buffer
is bounded: with the database away for long, the oldest entries are dropped (and counted in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from django.utils import timezone

from accounts.models import User
from optimagpt.inserts import rows_insert

from .models import RequestLogEntry
from .record import RequestRecord

log = logging.getLogger("optimagpt.operations.requestlog")

MAX_PENDING = 100_000
_pending: list[RequestRecord] = []
_dropped = 0


def request_log_add(record: RequestRecord) -> None:
    """Keep a finished request for the next write (a finisher: cheap, in the event loop)."""
    global _dropped
    if len(_pending) >= MAX_PENDING:
        del _pending[: MAX_PENDING // 10]
        _dropped += MAX_PENDING // 10
    _pending.append(record)


def _take() -> list[RequestRecord]:
    global _pending
    taken, _pending = _pending, []
    return taken


COLUMNS = ("at", "key_prefix", "user", "client", "method", "path", "operation", "model", "stream", "status",
           "error_code", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "node")


def _values(record: RequestRecord, usernames: dict[int, str]) -> tuple[Any, ...]:
    """One row, in COLUMNS' order, as the database takes it (no model instance: see optimagpt/inserts.py)."""
    ttft = record.ttft_s()
    return (connection.ops.adapt_datetimefield_value(datetime.fromtimestamp(record.start / 1e9, tz=UTC)),
            record.key_prefix, usernames.get(record.user_id, "") if record.user_id is not None else "",
            record.client[:64], record.method[:8], record.path[:200], record.operation, record.model[:200],
            record.stream, record.status, record.error_code[:64], round((record.done - record.start) / 1e6, 3),
            round(ttft * 1000, 3) if ttft is not None else None, min(record.prompt_tokens, 2**31 - 1),
            min(record.completion_tokens, 2**31 - 1), record.node_name()[:200])


def request_log_write(records: list[RequestRecord]) -> int:
    """Write finished requests (sync: in a thread, or at shutdown), in one prepared INSERT."""
    if not records:
        return 0
    user_ids = {r.user_id for r in records if r.user_id is not None}
    usernames = dict(User.objects.filter(pk__in=user_ids).values_list("pk", "username")) if user_ids else {}
    rows_insert(RequestLogEntry, COLUMNS, [_values(r, usernames) for r in records])
    return len(records)


async def request_log_forever(stop: asyncio.Event) -> None:
    """Write the buffer every OPTIMAGPT_REQUEST_LOG_FLUSH_S until `stop` is set, then what is left."""
    global _dropped
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.OPTIMAGPT_REQUEST_LOG_FLUSH_S)
        records = _take()
        if _dropped:
            log.warning("the request log dropped %d entries it could not write in time", _dropped)
            _dropped = 0
        try:
            await database_sync_to_async(request_log_write)(records)
        except Exception as exc:  # noqa: BLE001 - the database away for a moment: keep them for the next try
            log.warning("could not write %d request log entries: %s", len(records), type(exc).__name__)
            _pending[:0] = records[-(MAX_PENDING - len(_pending)):] if len(_pending) < MAX_PENDING else []
        if stop.is_set():
            return


def request_log_write_sync() -> None:
    """What is still buffered, written now (at shutdown, when no event loop runs any more)."""
    request_log_write(_take())


def request_log_prune() -> int:
    """Delete entries older than OPTIMAGPT_REQUEST_LOG_RETENTION_DAYS (sync; tasks.py runs it)."""
    cutoff = timezone.now() - timedelta(days=settings.OPTIMAGPT_REQUEST_LOG_RETENTION_DAYS)
    deleted, _ = RequestLogEntry.objects.filter(at__lt=cutoff).delete()
    return deleted


def entry_out(entry: RequestLogEntry) -> dict[str, Any]:
    return {"at": entry.at.isoformat(), "key_prefix": entry.key_prefix or None, "user": entry.user or None,
            "client": entry.client, "method": entry.method, "path": entry.path, "operation": entry.operation,
            "model": entry.model or None, "stream": entry.stream, "status": entry.status,
            "error_code": entry.error_code or None, "latency_ms": entry.latency_ms, "ttft_ms": entry.ttft_ms,
            "prompt_tokens": entry.prompt_tokens, "completion_tokens": entry.completion_tokens,
            "node": entry.node or None}
