"""Pick the executor for a request: a ready one for the model, the least busy first.

"Busy" is the number of requests this gateway process has in flight on the
executor. Ties go to the executor used least recently, so equal executors take
turns.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from nodes.models import Executor, Node

from ..errors import ModelNotFound, NoCapacity

_in_flight: Counter[int] = Counter()
_last_pick: dict[int, int] = {}
_ticket = itertools.count()


@dataclass(frozen=True)
class Target:
    executor_pk: int
    executor_key: str
    channel_name: str


async def executor_select(*, model: str) -> Target:
    """A ready executor of `model`; ModelNotFound when no node ever had it, NoCapacity when none is ready now."""
    rows = [
        row async for row in Executor.objects.filter(
            model_id=model,
            state=Executor.State.ONLINE,
            node__connected=True,
            node__activated=True,
            node__last_seen__gte=Node.live_cutoff(),
        ).values_list("pk", "key", "node__channel_name")
    ]
    if not rows:
        if await Executor.objects.filter(model_id=model).aexists():
            raise NoCapacity(f"No node can serve the model '{model}' right now.", param="model")
        raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
    pk, key, channel = min(rows, key=lambda r: (_in_flight[r[0]], _last_pick.get(r[0], -1)))
    _last_pick[pk] = next(_ticket)
    return Target(executor_pk=pk, executor_key=key, channel_name=channel)


def acquire(target: Target) -> None:
    _in_flight[target.executor_pk] += 1


def release(target: Target) -> None:
    _in_flight[target.executor_pk] -= 1
    if _in_flight[target.executor_pk] <= 0:
        del _in_flight[target.executor_pk]
