"""Periodic work of a gateway process when no Celery worker and beat run it (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from channels.db import database_sync_to_async
from django.conf import settings

log = logging.getLogger("optimagpt.nodes.housekeeping")


async def prune_forever(stop: asyncio.Event) -> None:
    """Run the node-history pruning task every OPTIMAGPT_PRUNE_INTERVAL_S until `stop` is set."""
    from .tasks import node_history_prune

    while not stop.is_set():
        try:
            pruned = await database_sync_to_async(lambda: node_history_prune.apply().get())()
            if any(pruned.values()):
                log.info("pruned node history: %s", pruned)
        except Exception:
            log.exception("pruning node history failed")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.OPTIMAGPT_PRUNE_INTERVAL_S)
