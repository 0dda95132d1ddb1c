"""Periodic work of a gateway process when no Celery worker and beat run it (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from celery import Task
from channels.db import database_sync_to_async
from django.conf import settings

log = logging.getLogger("optimagpt.nodes.housekeeping")


async def prune_forever(stop: asyncio.Event, tasks: list[Task] | None = None) -> None:
    """Run the pruning tasks (node history's, and any given) every OPTIMAGPT_PRUNE_INTERVAL_S until `stop` is set."""
    from .tasks import node_history_prune

    for_each = [node_history_prune, *(tasks or ())]
    while not stop.is_set():
        for task in for_each:
            try:
                pruned = await database_sync_to_async(lambda t=task: t.apply().get())()
                if any(pruned.values()):
                    log.info("%s: %s", task.name, pruned)
            except Exception:
                log.exception("%s failed", task.name)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.OPTIMAGPT_PRUNE_INTERVAL_S)
