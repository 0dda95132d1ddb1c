"""Pick the executor for a request: a ready one for the model, the least busy first.

"Busy" is the number of requests this gateway process has in flight on the
executor. Ties go to the executor used least recently, so equal executors take
turns. An executor that is (re)starting on a live node is picked only when no
online one exists: the request waits on the node until the process is up.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.dispatch import receiver

from nodes.models import Executor
from nodes.signals import executors_changed

from ..errors import ModelNotFound, NoCapacity

_in_flight: Counter[int] = Counter()
_last_pick: dict[int, int] = {}
_ticket = itertools.count()
# model id -> (valid until, routable executors as (pk, key, channel, online, node pk)). A database
# query costs a thread hop per request; changes made by this process's node
# links clear the cache at once, other processes' within OPTIMAGPT_ROUTE_CACHE_S.
_ready: dict[str, tuple[float, list[tuple[int, str, str, bool, int | None]]]] = {}


@dataclass(frozen=True)
class Target:
    executor_pk: int
    executor_key: str
    channel_name: str  # the node link's consumer; empty for a remote upstream, which this gateway calls itself
    node_pk: int | None = None

    @property
    def remote(self) -> bool:
        return not self.channel_name


async def executor_select(*, model: str) -> Target:
    """A ready executor of `model`; ModelNotFound when no node ever had it, NoCapacity when none is ready now."""
    cached = _ready.get(model)
    if cached is not None and cached[0] > time.monotonic():
        rows = cached[1]
    else:
        rows = await database_sync_to_async(_ready_executors)(model)
        if rows:
            _ready[model] = (time.monotonic() + settings.OPTIMAGPT_ROUTE_CACHE_S, rows)
    if not rows:
        if await database_sync_to_async(Executor.objects.filter(model_id=model).exists)():
            raise NoCapacity(f"No node can serve the model '{model}' right now.", param="model")
        raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
    pk, key, channel, _, node_pk = min(rows, key=lambda r: (not r[3], _in_flight[r[0]], _last_pick.get(r[0], -1)))
    _last_pick[pk] = next(_ticket)
    return Target(executor_pk=pk, executor_key=key, channel_name=channel or "", node_pk=node_pk)


def _ready_executors(model: str) -> list[tuple[int, str, str, bool, int | None]]:
    rows = Executor.objects.routable(model=model).values_list("pk", "key", "node__channel_name", "state", "node_id")
    return [(pk, key, channel, state == Executor.State.ONLINE, node) for pk, key, channel, state, node in rows]


def acquire(target: Target) -> None:
    _in_flight[target.executor_pk] += 1


def release(target: Target) -> None:
    _in_flight[target.executor_pk] -= 1
    if _in_flight[target.executor_pk] <= 0:
        del _in_flight[target.executor_pk]


@receiver(executors_changed)
def _forget_routes(sender: Any, **kwargs: Any) -> None:
    _ready.clear()
