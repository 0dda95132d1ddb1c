"""The Nodes page's stats panel: requests handled, delayed requests, concurrency and its spread over nodes.

Counted in each gateway process without touching the database or Redis on the
request path (a few dict updates per request); each process writes its totals
to one row every few seconds, and the page sums the rows of live processes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC

from django.conf import settings


@dataclass
class ProcessStats:
    started_at: float = field(default_factory=time.time)
    requests: int = 0
    delayed: int = 0
    in_flight: int = 0
    peak_concurrency: int = 0
    per_node: Counter[str] = field(default_factory=Counter)  # node pk (as text: JSON keys) -> requests
    peak_per_node: Counter[str] = field(default_factory=Counter)  # node pk -> most requests in flight at once
    _node_in_flight: Counter[str] = field(default_factory=Counter)


stats = ProcessStats()


def request_started(node_pk: int | None) -> None:
    node = str(node_pk or "remote")
    stats.in_flight += 1
    stats.peak_concurrency = max(stats.peak_concurrency, stats.in_flight)
    stats._node_in_flight[node] += 1
    stats.peak_per_node[node] = max(stats.peak_per_node[node], stats._node_in_flight[node])


def request_finished(node_pk: int | None, *, waited_s: float, counted: bool = True) -> None:
    """`waited_s`: from the request's start to its first event (queueing and prompt processing).

    An attempt that failed over to another node is not `counted`: the request is, once, by its last attempt.
    """
    node = str(node_pk or "remote")
    stats.in_flight -= 1
    stats._node_in_flight[node] -= 1
    if not counted:
        return
    stats.requests += 1
    stats.per_node[node] += 1
    if waited_s > settings.OPTIMAGPT_DELAYED_REQUEST_S:
        stats.delayed += 1


PUBLISH_INTERVAL_S = 5.0
LIVE_WITHIN_S = 30.0  # a process that has not written for this long has stopped


def stats_publish(*, owner: str) -> None:
    """Write this process's totals to its row (sync: run in a thread)."""
    from datetime import datetime

    from .models import GatewayProcess

    GatewayProcess.objects.update_or_create(owner=owner, defaults={
        "started_at": datetime.fromtimestamp(stats.started_at, tz=UTC),
        "updated_at": datetime.now(tz=UTC), "requests": stats.requests, "delayed": stats.delayed,
        "peak_concurrency": stats.peak_concurrency, "per_node": dict(stats.per_node),
        "peak_per_node": dict(stats.peak_per_node)})


def stats_retire(*, owner: str) -> None:
    from .models import GatewayProcess

    GatewayProcess.objects.filter(owner=owner).delete()


async def publish_forever(*, owner: str, stop: asyncio.Event) -> None:
    import contextlib
    import logging

    from channels.db import database_sync_to_async

    while not stop.is_set():
        try:
            await database_sync_to_async(stats_publish)(owner=owner)
        except Exception:
            logging.getLogger("optimagpt.gateway.stats").exception("could not write the gateway's stats")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), PUBLISH_INTERVAL_S)
    with contextlib.suppress(Exception):
        await database_sync_to_async(stats_retire)(owner=owner)


@dataclass(frozen=True)
class Summary:
    requests: int
    delayed: int
    peak_concurrency: int
    uptime_s: float | None
    node_share: list[tuple[str, int, float, int]]  # (node name, requests, share of all, peak in flight)


def stats_summary() -> Summary:
    """The live gateway processes' totals, summed (sync)."""
    from datetime import datetime, timedelta

    from nodes.models import Node

    from .models import GatewayProcess

    now = datetime.now(tz=UTC)
    rows = list(GatewayProcess.objects.filter(updated_at__gte=now - timedelta(seconds=LIVE_WITHIN_S)))
    per_node: Counter[str] = Counter()
    peaks: Counter[str] = Counter()
    for row in rows:
        per_node.update({k: int(v) for k, v in row.per_node.items()})
        peaks.update({k: int(v) for k, v in row.peak_per_node.items()})
    names = dict(Node.objects.filter(pk__in=[int(k) for k in per_node if k.isdigit()]).values_list("pk", "name"))
    total = sum(per_node.values())
    share = sorted(((names.get(int(k), "deleted node") if k.isdigit() else "remote upstreams", n,
                     n / total if total else 0.0, peaks[k]) for k, n in per_node.items()), key=lambda r: -r[1])
    return Summary(requests=sum(r.requests for r in rows), delayed=sum(r.delayed for r in rows),
                   peak_concurrency=sum(r.peak_concurrency for r in rows),
                   uptime_s=(now - min(r.started_at for r in rows)).total_seconds() if rows else None,
                   node_share=share)
