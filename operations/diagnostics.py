"""The Diagnostics page's log view: every node's log lines and the gateway's, in one stream.

Node lines are in the database already (nodes/services.py keeps what each agent sends). The gateway's
own lines are caught by `DiagnosticsHandler` (settings.LOGGING puts it on the root logger): the last
LOG_LINES_KEPT in this process's memory and, with Redis, in one Redis list that every gateway process
adds to (a loop pushes them; logging never waits on Redis), each line marked with its process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from .record import PROCESS

LOG_LINES_KEPT = 5000
REDIS_KEY = "optimagpt:gateway-logs"
PUSH_TIMEOUT_S = 10.0
PUSH_INTERVAL_S = 0.5
MAX_MESSAGE = 4000
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_lines: deque[dict[str, Any]] = deque(maxlen=LOG_LINES_KEPT)
_unpushed: deque[dict[str, Any]] = deque(maxlen=LOG_LINES_KEPT)
_sequence = itertools.count(1)
_lock = threading.Lock()


class DiagnosticsHandler(logging.Handler):
    """Keeps the gateway's log lines for the Diagnostics page (any thread may log)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not break logging
            message = str(record.msg)
        if record.exc_info and record.exc_info[0] is not None:
            message += f" ({record.exc_info[0].__name__})"  # the type only: a traceback may hold values
        with _lock:
            line = {"seq": next(_sequence), "t": record.created, "level": record.levelname,
                    "logger": record.name[:100], "message": message[:MAX_MESSAGE], "process": PROCESS}
        _lines.append(line)
        if settings.REDIS_URL:
            _unpushed.append(line)


async def gateway_logs_forever(stop: asyncio.Event) -> None:
    """With Redis: push this process's new lines every PUSH_INTERVAL_S until `stop` is set."""
    if not settings.REDIS_URL:
        return
    from .shared import async_client  # here: settings.LOGGING loads this module before Django is set up

    client = async_client()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PUSH_INTERVAL_S)
            pending = []
            while _unpushed:
                pending.append(_unpushed.popleft())
            if not pending:
                continue
            try:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.rpush(REDIS_KEY, *(json.dumps(line, separators=(",", ":")) for line in pending))
                    pipe.ltrim(REDIS_KEY, -LOG_LINES_KEPT, -1)
                    await asyncio.wait_for(pipe.execute(), PUSH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - Redis away: try these lines again next time (the deque is bounded)
                _unpushed.extendleft(reversed(pending))
    finally:
        await client.aclose()


def _gateway_lines() -> list[dict[str, Any]]:
    if not settings.REDIS_URL:
        return list(_lines)
    from .shared import sync_client

    try:
        texts: list[bytes] = sync_client().lrange(REDIS_KEY, 0, -1)  # type: ignore[assignment] # redis types sync and async alike
        return [json.loads(t) for t in texts]
    except Exception:  # noqa: BLE001 - Redis away: this process's own lines still show
        return list(_lines)


def logs_read(*, since: float, levels: set[str], node: str, limit: int = 500) -> dict[str, Any]:
    """Log lines after `since` (epoch seconds), oldest first; `node` is a node's pk, "gateway", or "" for all.

    The newest `limit` lines when there are more; `until` is where the next poll starts.
    """
    lines: list[dict[str, Any]] = []
    if node in ("", "gateway"):
        lines += [{**line, "source": "gateway", "node": "Gateway"} for line in _gateway_lines()
                  if line["t"] > since and (not levels or line["level"] in levels)]
    if node != "gateway":
        from nodes.models import NodeLog  # here: settings.LOGGING loads this module before the models

        rows = NodeLog.objects.filter(at__gt=datetime.fromtimestamp(since, tz=UTC)).select_related("node")
        if node:
            rows = rows.filter(node_id=int(node) if node.isdigit() else -1)
        if levels:
            rows = rows.filter(level__in=levels)
        for row in rows.order_by("-at", "-pk")[:limit]:
            lines.append({"t": row.at.timestamp(), "level": row.level, "logger": row.logger,
                          "message": row.message, "source": "node", "node": row.node.name})
    lines.sort(key=lambda line: line["t"])
    lines = lines[-limit:]
    return {"lines": lines, "until": lines[-1]["t"] if lines else since, "now": time.time()}
