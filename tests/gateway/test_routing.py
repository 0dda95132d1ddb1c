"""Routing decisions, in process: 404 for a model nobody has, 503 for one no connected node can serve."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from gateway.routing.router import acquire, executor_select, release
from nodes.models import Executor, Node
from optimagpt.errors import ModelNotFound, NoCapacity
from tests.factories import akey_make, anode_make

pytestmark = pytest.mark.django_db(transaction=True)


async def test_an_unknown_model_is_not_found() -> None:
    with pytest.raises(ModelNotFound):
        await executor_select(model="nobody-has-this")


async def test_a_known_model_on_a_disconnected_node_is_503_through_the_api() -> None:
    node = await anode_make("gone", connected=False)
    await Executor.objects.acreate(node=node, key="m.gguf", model_id="m", state="online")
    key, raw = await akey_make("routing")
    response = await AsyncClient().post("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hi"}]}, content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    with pytest.raises(NoCapacity):
        await executor_select(model="m")


async def test_it_picks_the_least_busy_executor_and_takes_turns_among_equals() -> None:
    a, b = await anode_make("a"), await anode_make("b")
    await Executor.objects.acreate(node=a, key="m.gguf", model_id="m", state="online")
    await Executor.objects.acreate(node=b, key="m.gguf", model_id="m", state="online")
    await Executor.objects.acreate(node=b, key="other.gguf", model_id="other", state="online")
    first = await executor_select(model="m")
    acquire(first)
    second = await executor_select(model="m")
    assert second.channel_name != first.channel_name
    release(first)
    third = await executor_select(model="m")
    assert third.channel_name == first.channel_name, "equally idle: the one used longest ago goes next"


async def test_stopped_failed_and_stopping_executors_are_never_picked() -> None:
    node = await anode_make("n")
    for state in ("offline", "failed", "stopping"):
        await Executor.objects.acreate(node=node, key=f"{state}.gguf", model_id="m", state=state)
    with pytest.raises(NoCapacity):
        await executor_select(model="m")


async def test_a_starting_executor_is_picked_only_when_none_is_online() -> None:
    a, b = await anode_make("a"), await anode_make("b")
    starting = await Executor.objects.acreate(node=a, key="m.gguf", model_id="m", state="starting")
    assert (await executor_select(model="m")).executor_pk == starting.pk, "requests wait for a restarting process"
    online = await Executor.objects.acreate(node=b, key="m.gguf", model_id="m", state="online")
    from nodes.signals import executors_changed

    executors_changed.send(sender=Executor)
    picked = []
    for _ in range(2):  # its two slots (one process, two requests each)
        picked.append(await executor_select(model="m"))
        acquire(picked[-1])
    for target in picked:
        release(target)
    assert {t.executor_pk for t in picked} == {online.pk}, "an online executor wins even when busier"


async def test_concurrent_requests_on_a_cold_cache_share_one_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """400 requests at once on an empty route cache ran 400 identical queries on the one database thread."""
    import asyncio

    from gateway.routing import router

    node = await anode_make("herd")
    await Executor.objects.acreate(node=node, key="m.gguf", model_id="m", state="online")
    router._routable_cache.clear()
    queries = 0
    real = router._routable_rows_query

    def counted(model: str) -> list[router.Row]:
        nonlocal queries
        queries += 1
        return real(model)

    monkeypatch.setattr(router, "_routable_rows_query", counted)
    targets = await asyncio.gather(*(executor_select(model="m") for _ in range(50)))
    assert queries == 1
    assert {t.channel_name for t in targets} == {"chan-herd"}


async def test_a_change_during_a_load_is_not_hidden_by_that_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Executors that change while a query runs: the result it read is used once, not cached for the next."""
    from gateway.routing import router
    from nodes.signals import executors_changed

    node = await anode_make("moving")
    await Executor.objects.acreate(node=node, key="m.gguf", model_id="m", state="online")
    router._routable_cache.clear()
    real = router._routable_rows_query

    def changed_meanwhile(model: str) -> list[router.Row]:
        rows = real(model)
        executors_changed.send(sender=Executor)
        return rows

    monkeypatch.setattr(router, "_routable_rows_query", changed_meanwhile)
    assert (await executor_select(model="m")).channel_name == "chan-moving"
    assert router._routable_cache.get("m") is None


async def test_a_request_sent_as_its_link_closed_fails_over_within_seconds_not_at_its_timeout() -> None:
    """The soak found it: routed to a link that closed the moment before, a request reached no consumer and
    waited its whole first-event timeout (120 s). Its waiter now sees the link gone and fails it over."""
    import asyncio
    import time

    node = await anode_make("closing")
    await Executor.objects.acreate(node=node, key="m.gguf", model_id="m", state="online")
    _, raw = await akey_make("routing")

    async def ask() -> object:
        return await AsyncClient().post("/v1/chat/completions", {"model": "m", "messages": [
            {"role": "user", "content": "hi"}]}, content_type="application/json",
            headers={"Authorization": f"Bearer {raw}"})

    started = time.monotonic()
    request = asyncio.ensure_future(ask())
    await asyncio.sleep(0.5)  # sent to "chan-closing", which no consumer reads
    # As the link's close does, from another thread (the request's own sync thread is the one it waits on).
    await asyncio.to_thread(lambda: Node.objects.filter(pk=node.pk).update(connected=False, channel_name=""))
    response = await asyncio.wait_for(request, 15)
    assert time.monotonic() - started < 6
    assert response.status_code == 502 and response.json()["error"]["code"] == "node_disconnected"
