"""Pick the executor for a request, and hold requests in a fair, bounded queue while every slot is busy.

Every executor has slots: the processes it runs (replicas) times the requests
each decodes together (parallel), each slot taking OPTIMAGPT_REQUESTS_PER_SLOT
requests at once (one generating and the next one ready on the node, so a
sequence never idles between requests). Its load is
what this gateway process has in flight on it plus what the other gateway
processes report through Redis (gateway/routing/shared.py). A request goes to
a free executor of its model, chosen by the strategy in OPTIMAGPT_ROUTING:

- `least_busy` (default): the smallest share of its slots in use; ties go to
  the executor used least recently, so equal executors take turns.
- `round_robin`: the free executors in turn, whatever their load.

An executor that is (re)starting on a live node is picked only when no online
one exists: the request waits on the node until the process is up. Remote
upstreams have no slots we know of and are never full.

When no executor of the model has a free slot, the request waits in the
model's queue. The queue serves API keys in turn (one waiting request of each
key, then the next round), so a key with a thousand requests waiting delays
another key's request by at most one request per key. Past
OPTIMAGPT_QUEUE_MAX_LENGTH waiting requests a new one is refused with 429; one
that waited OPTIMAGPT_QUEUE_MAX_WAIT_S gets 503; both with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from channels.db import database_sync_to_async
from django.conf import settings
from django.dispatch import receiver

from nodes.models import Executor
from nodes.signals import executors_changed
from operations.record import note_queued
from optimagpt.cache import ExpiringCache
from optimagpt.errors import ApiError, ModelNotFound, NoCapacity, QueueFull

from . import load

STRATEGIES = ("least_busy", "round_robin")
GRANT_TICK_S = 0.05  # how often waiting requests look again for slots freed in other gateway processes

_last_pick: dict[int, int] = {}
_ticket = itertools.count()


class Row(NamedTuple):
    pk: int
    key: str
    channel: str  # the node link's consumer; empty for a remote upstream
    online: bool
    node_pk: int | None
    slots: int  # processes that can take requests
    node_name: str = ""  # for the provenance headers and the request log
    sha256: str = ""  # the served file's, once the node has hashed it


# model id -> its routable executors. A database query costs a thread hop per request; changes
# made by this process's node links clear the cache at once, other processes' within OPTIMAGPT_ROUTE_CACHE_S.
_routable_cache: ExpiringCache[str, list[Row]] = ExpiringCache(lambda: settings.OPTIMAGPT_ROUTE_CACHE_S)


@dataclass(frozen=True)
class Target:
    executor_pk: int
    executor_key: str
    channel_name: str  # the node link's consumer; empty for a remote upstream, which this gateway calls itself
    node_pk: int | None = None
    model: str = ""
    node_name: str = ""
    sha256: str = ""

    @property
    def remote(self) -> bool:
        return not self.channel_name


def strategy() -> str:
    """OPTIMAGPT_ROUTING, which settings.py has already checked is one of STRATEGIES."""
    return str(settings.OPTIMAGPT_ROUTING)


def capacity(row: Row) -> float:
    if not row.channel:
        return math.inf  # a remote upstream queues for itself
    return max(row.slots, 1) * settings.OPTIMAGPT_REQUESTS_PER_SLOT


async def routable_rows(model: str) -> list[Row]:
    """The executors that can take a request for `model` now (cached; a model with none is asked again)."""
    return await _routable_cache.get_or_load(model, lambda: database_sync_to_async(_routable_rows_query)(model),
                                             keep=bool)


def _routable_rows_query(model: str) -> list[Row]:
    rows = Executor.objects.routable(model=model).values_list(
        "pk", "key", "node__channel_name", "state", "node_id", "replicas", "replicas_online", "parallel", "node__name",
        "sha256")
    out = []
    for pk, key, channel, state, node, replicas, replicas_online, parallel, node_name, sha256 in rows:
        online = state == Executor.State.ONLINE
        out.append(Row(pk, key, channel or "", online, node, (replicas_online if online else replicas) * parallel,
                       node_name or "", sha256 if len(sha256 or "") == 64 else ""))
    return out


async def model_known(model: str) -> bool:
    """Whether any node serves or ever served `model` (what ModelNotFound means), asked without routing."""
    return bool(await routable_rows(model)) or await database_sync_to_async(
        Executor.objects.filter(model_id=model).exists)()


async def executor_select(*, model: str, exclude_nodes: frozenset[int] = frozenset(),
                          avoid_executors: frozenset[int] = frozenset()) -> Target | None:
    """A free executor of `model` by the strategy, or None when all are busy.

    Raises ModelNotFound when no node ever had the model, NoCapacity when none can serve it now
    (or none but on `exclude_nodes`: nodes a failed attempt lost). Executors in `avoid_executors`
    (one that failed an attempt) are taken only when the model has no other.
    """
    rows = await routable_rows(model)
    if not rows:
        if await database_sync_to_async(Executor.objects.filter(model_id=model).exists)():
            raise NoCapacity(f"No node can serve the model '{model}' right now.", param="model")
        raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
    if exclude_nodes:
        rows = [r for r in rows if r.node_pk is None or r.node_pk not in exclude_nodes]
        if not rows:
            raise NoCapacity(f"No other node can serve the model '{model}' right now.", param="model")
    if avoid_executors:
        rows = [r for r in rows if r.pk not in avoid_executors] or rows
    if not all(r.online for r in rows) and any(r.online for r in rows):
        rows = [r for r in rows if r.online]
    best: tuple[Any, ...] | None = None
    row = None
    round_robin = strategy() == "round_robin"
    for r in rows:
        in_use = load.in_flight(r.pk)
        slots = capacity(r)
        if in_use >= slots:
            continue
        rank = (_last_pick.get(r.pk, -1),) if round_robin else (in_use / slots, _last_pick.get(r.pk, -1))
        if best is None or rank < best:
            best, row = rank, r
    if row is None:
        return None
    _last_pick[row.pk] = next(_ticket)
    return Target(executor_pk=row.pk, executor_key=row.key, channel_name=row.channel, node_pk=row.node_pk,
                  model=model, node_name=row.node_name, sha256=row.sha256)


def acquire(target: Target) -> None:
    load.add(target.executor_pk)


def release(target: Target, *, held_s: float | None = None) -> None:
    load.remove(target.executor_pk)
    queue = _queues.get(target.model)
    if queue is not None:
        if held_s is not None:
            queue.service_s = 0.9 * queue.service_s + 0.1 * held_s
        queue.wake.set()


# -- the queue ------------------------------------------------------------------
@dataclass(eq=False)
class _Waiter:
    key: str
    exclude_nodes: frozenset[int]
    avoid_executors: frozenset[int]
    future: asyncio.Future[Target]


@dataclass(eq=False)
class ModelQueue:
    model: str
    by_key: OrderedDict[str, deque[_Waiter]] = field(default_factory=OrderedDict)  # rotation order of keys
    length: int = 0
    service_s: float = 1.0  # a running average of how long a request holds its slot
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    granter: asyncio.Task[None] | None = None

    def add(self, waiter: _Waiter) -> None:
        self.by_key.setdefault(waiter.key, deque()).append(waiter)
        self.length += 1

    def remove(self, waiter: _Waiter) -> None:
        waiters = self.by_key.get(waiter.key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            self.length -= 1
            if not waiters:
                del self.by_key[waiter.key]

    def next_waiter(self) -> _Waiter:
        """The first waiter of the key whose turn it is."""
        return self.by_key[next(iter(self.by_key))][0]

    def served(self, waiter: _Waiter) -> None:
        """Take the served waiter off, and send its key to the back of the rotation."""
        waiters = self.by_key.pop(waiter.key)
        waiters.popleft()
        self.length -= 1
        if waiters:
            self.by_key[waiter.key] = waiters

    def retry_after(self, total_capacity: float) -> int:
        """Seconds until the queue has likely moved on, for Retry-After: 1 to 60."""
        slots = total_capacity if math.isfinite(total_capacity) and total_capacity > 0 else 1
        return int(min(60, max(1, math.ceil(self.service_s * (self.length + 1) / slots))))


_queues: dict[str, ModelQueue] = {}


def queued_models() -> list[str]:
    """The models with requests waiting in this process."""
    return sorted(model for model, queue in list(_queues.items()) if queue.length)  # (a scrape's thread reads it)


def queued(model: str | None = None) -> int:
    """Requests waiting for a slot in this process: for one model, or all."""
    if model is not None:
        queue = _queues.get(model)
        return queue.length if queue else 0
    return sum(q.length for q in _queues.values())


async def _total_capacity(model: str) -> float:
    return sum(capacity(r) for r in await routable_rows(model)) or 1


async def route(*, model: str, key: str, deadline: float, exclude_nodes: frozenset[int] = frozenset(),
                avoid_executors: frozenset[int] = frozenset(),
                abandon: asyncio.Future[None] | None = None) -> Target:
    """A free executor of `model`, its slot taken (give it back with `release`); waits in the queue if need be.

    `key` is whose request it is (the API key, or the user), for the queue's turns; `deadline` is
    the request's own (loop time); `abandon`, once done, takes a waiting request out of the queue
    (its key was revoked) and returns any target at once. Raises ModelNotFound, NoCapacity, or QueueFull.
    """
    queue = _queues.get(model)
    if queue is None or not queue.length:
        target = await executor_select(model=model, exclude_nodes=exclude_nodes, avoid_executors=avoid_executors)
        if target is not None:
            acquire(target)
            return target
        queue = _queues.setdefault(model, ModelQueue(model))
    if queue.length >= settings.OPTIMAGPT_QUEUE_MAX_LENGTH:
        raise QueueFull(f"Too many requests are waiting for the model '{model}'; try again later.",
                        retry_after=queue.retry_after(await _total_capacity(model)))
    loop = asyncio.get_running_loop()
    waiter = _Waiter(key, exclude_nodes, avoid_executors, loop.create_future())
    queue.add(waiter)
    note_queued()
    if queue.granter is None or queue.granter.done():
        queue.granter = asyncio.ensure_future(_grant(queue))
    wait_s = min(settings.OPTIMAGPT_QUEUE_MAX_WAIT_S, deadline - loop.time())
    future = waiter.future
    try:
        waits: set[asyncio.Future[Any]] = {future} if abandon is None else {future, abandon}
        await asyncio.wait(waits, timeout=max(wait_s, 0.0), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the client left while it waited
        if future.done() and not future.cancelled() and future.exception() is None:
            release(future.result())  # granted at that very moment: give the slot back
        queue.remove(waiter)
        future.cancel()
        raise
    if not future.done():
        queue.remove(waiter)
        future.cancel()
        if abandon is not None and abandon.done():
            raise NoCapacity("The request left the queue.", code="abandoned")  # the caller says why
        raise NoCapacity(f"Every node serving '{model}' stayed busy for {wait_s:.0f} s; try again later.",
                         param="model", code="queue_timeout",
                         retry_after=queue.retry_after(await _total_capacity(model)))
    return future.result()  # a Target, or the error that ended the wait


async def _grant(queue: ModelQueue) -> None:
    """Give freed slots to waiting requests, one key after another, until nobody waits."""
    while queue.length:
        while queue.length:
            waiter = queue.next_waiter()
            try:
                target = await executor_select(model=queue.model, exclude_nodes=waiter.exclude_nodes,
                                               avoid_executors=waiter.avoid_executors)
            except ApiError as exc:  # the model's last node went away: nobody will free a slot
                queue.served(waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
                continue
            if target is None:
                break
            queue.served(waiter)
            if waiter.future.done():  # gave up a moment ago
                continue
            acquire(target)
            waiter.future.set_result(target)
        queue.wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(queue.wake.wait(), GRANT_TICK_S)


@receiver(executors_changed)
def _forget_routes(sender: Any, **kwargs: Any) -> None:
    _routable_cache.clear()  # (waiting requests look again within GRANT_TICK_S)
