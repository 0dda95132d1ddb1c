"""The router's slots, strategies and queue, in process: fair turns across keys, bounds, Retry-After."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.test import AsyncClient
from django.utils import timezone

from gateway.routing import load, router, shared
from gateway.routing.router import Target, acquire, executor_select, release, route
from nodes.models import Executor, Node
from optimagpt.errors import NoCapacity, QueueFull
from tests.factories import akey_make

pytestmark = pytest.mark.django_db(transaction=True)


async def _executor(name: str, *, model: str = "m", replicas_online: int = 1) -> Executor:
    node = await Node.objects.acreate(node_id=uuid.uuid4(), name=name, connected=True, channel_name=f"chan-{name}",
                                      last_seen=timezone.now())
    return await Executor.objects.acreate(node=node, key=f"{model}.gguf", model_id=model, state="online",
                                          replicas=replicas_online, replicas_online=replicas_online)


def _deadline(seconds: float = 30.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def _fill(model: str = "m") -> list[Target]:
    """Take every free slot of the model."""
    held = []
    while (target := await executor_select(model=model)) is not None:
        acquire(target)
        held.append(target)
    return held


async def test_an_executor_takes_requests_per_slot_for_each_process(settings) -> None:
    settings.OPTIMAGPT_REQUESTS_PER_SLOT = 2
    await _executor("one", replicas_online=3)
    held = await _fill()
    assert len(held) == 6
    for target in held:
        release(target)


async def test_the_queue_serves_keys_in_turn_so_one_key_cannot_starve_another() -> None:
    await _executor("only")
    held = await _fill()
    granted: list[str] = []

    async def ask(key: str) -> None:
        target = await route(model="m", key=key, deadline=_deadline())
        granted.append(key)
        held.append(target)

    tasks = [asyncio.create_task(ask("greedy")) for _ in range(10)]
    await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(ask("polite")))
    await asyncio.sleep(0.05)
    assert router.queued("m") == 11
    while len(granted) < 11:
        release(held.pop(0))  # one slot frees up at a time
        await asyncio.sleep(0.02)
    await asyncio.gather(*tasks)
    assert granted.index("polite") <= 1, f"the second key waited behind the first one's ten: {granted}"
    for target in held:
        release(target)


async def test_a_full_queue_refuses_with_429_and_retry_after(settings) -> None:
    settings.OPTIMAGPT_QUEUE_MAX_LENGTH = 3
    await _executor("only")
    held = await _fill()
    waiting = [asyncio.create_task(route(model="m", key="k", deadline=_deadline())) for _ in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull) as refused:
        await route(model="m", key="k", deadline=_deadline())
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert 1 <= refused.value.retry_after <= 60
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert router.queued("m") == 0, "requests that gave up leave the queue"
    for target in held:
        release(target)


async def test_waiting_past_the_longest_wait_is_503_with_retry_after(settings) -> None:
    settings.OPTIMAGPT_QUEUE_MAX_WAIT_S = 0.3
    await _executor("only")
    held = await _fill()
    started = asyncio.get_running_loop().time()
    with pytest.raises(NoCapacity) as timed_out:
        await route(model="m", key="k", deadline=_deadline())
    waited = asyncio.get_running_loop().time() - started
    assert 0.3 <= waited < 2
    assert timed_out.value.status == 503 and timed_out.value.code == "queue_timeout"
    assert timed_out.value.retry_after >= 1
    assert router.queued("m") == 0
    for target in held:
        release(target)


async def test_a_request_leaving_the_queue_as_its_slot_comes_gives_the_slot_back() -> None:
    executor = await _executor("only")
    held = await _fill()
    task = asyncio.create_task(route(model="m", key="k", deadline=_deadline()))
    await asyncio.sleep(0.05)
    task.cancel()
    release(held.pop())
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.1)
    assert load.in_flight(executor.pk) == len(held), "no slot is lost to a request that left"
    for target in held:
        release(target)


async def test_round_robin_takes_turns_whatever_the_load_and_least_busy_avoids_the_busy_one(settings) -> None:
    a, b, c = await _executor("a"), await _executor("b"), await _executor("c")
    settings.OPTIMAGPT_ROUTING = "least_busy"
    busy = Target(executor_pk=a.pk, executor_key="m.gguf", channel_name="chan-a", node_pk=a.node_id, model="m")
    acquire(busy)
    picks = [(await executor_select(model="m")).executor_pk for _ in range(4)]
    assert a.pk not in picks[:2], "least busy: the idle executors first"
    settings.OPTIMAGPT_ROUTING = "round_robin"
    picks = [(await executor_select(model="m")).executor_pk for _ in range(6)]
    assert picks[:3] != picks[3:6] or len(set(picks[:3])) == 3
    assert sorted(picks[:3]) == sorted([a.pk, b.pk, c.pk]), "round robin: each in turn, the busy one too"
    release(busy)


async def test_a_full_queue_reaches_the_client_as_openai_error_with_retry_after(settings) -> None:


    _, api_key = await akey_make("queue")
    settings.OPTIMAGPT_QUEUE_MAX_LENGTH = 0
    await _executor("only")
    held = await _fill()
    response = await AsyncClient().post("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hi"}]}, content_type="application/json",
        headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "queue_full"
    assert int(response.headers["Retry-After"]) >= 1
    for target in held:
        release(target)


async def test_other_gateway_processes_counts_arrive_through_redis(settings, redis_url) -> None:
    import redis.asyncio as redis

    settings.REDIS_URL = redis_url
    settings.OPTIMAGPT_SHARED_LOAD_INTERVAL_S = 0.05
    executor = await _executor("shared")
    other = redis.Redis.from_url(redis_url)
    await other.hset(shared.PREFIX + "other-process", mapping={str(executor.pk): 2})
    await other.expire(shared.PREFIX + "other-process", 5)
    stop = asyncio.Event()
    loop = asyncio.create_task(shared.share_forever(owner="this-process", stop=stop))
    try:
        for _ in range(50):
            if load.others[executor.pk] == 2:
                break
            await asyncio.sleep(0.05)
        assert load.others[executor.pk] == 2
        assert await executor_select(model="m") is None, "both slots are taken by the other process"
        target = Target(executor_pk=executor.pk, executor_key="m.gguf", channel_name="chan-shared",
                        node_pk=executor.node_id, model="m")
        acquire(target)
        for _ in range(50):
            if await other.hget(shared.PREFIX + "this-process", str(executor.pk)) == b"1":
                break
            await asyncio.sleep(0.05)
        assert await other.hget(shared.PREFIX + "this-process", str(executor.pk)) == b"1"
        release(target)
    finally:
        stop.set()
        await loop
        await other.delete(shared.PREFIX + "other-process")
        assert not await other.exists(shared.PREFIX + "this-process"), "a stopping process takes its counts away"
        await other.aclose()
        load.others.clear()
