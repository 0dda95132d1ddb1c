"""Stored responses in the database: who owns them, the turns of a chain, stale background rows, pruning."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.test import override_settings
from django.utils import timezone

from gateway.principal import Principal
from optimagpt.errors import ApiError
from responses_api import services
from responses_api.models import StoredResponse
from responses_api.tasks import responses_prune
from tests.factories import key_make, user_make

pytestmark = pytest.mark.django_db(transaction=True)


def _row(principal: Principal, rid: str, previous: str = "", status: str = "completed", **fields: Any) -> None:
    StoredResponse.objects.create(
        id=rid, user_id=principal.user_id,
        api_key=principal.api_key if principal.user_id is None else None, model="m", status=status,
        previous_id=previous, input_items=[{"id": f"in-{rid}", "type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": rid}]}],
        output=[{"id": f"out-{rid}", "type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": f"re {rid}"}]}], **fields)


async def test_a_chain_is_its_turns_oldest_first_and_stops_at_a_deleted_response() -> None:
    key, _ = await _key("chain")
    me = Principal(user_id=None, api_key=key)
    for rid, previous in (("r1", ""), ("r2", "r1"), ("r3", "r2"), ("r4", "r3")):
        await _sync(_row, me, rid, previous)
    items = await services.history(me, "r4")
    assert [i["id"] for i in items] == ["in-r1", "out-r1", "in-r2", "out-r2", "in-r3", "out-r3", "in-r4", "out-r4"]
    await _sync(lambda: StoredResponse.objects.filter(pk="r2").delete())
    assert [i["id"] for i in await services.history(me, "r4")] == ["in-r3", "out-r3", "in-r4", "out-r4"]


async def test_a_response_is_its_owners_alone() -> None:
    alice, bob = await _sync(user_make, "alice"), await _sync(user_make, "bob")
    alice_key, _ = await _key("a1", owner=alice)
    alice_other_key, _ = await _key("a2", owner=alice)
    ownerless, _ = await _key("none")
    alice_p = Principal(user_id=alice.pk, api_key=alice_key)
    await _sync(_row, alice_p, "ra")
    # Another key of the same person, and the person with a JWT, see it; nobody else does.
    for same in (Principal(user_id=alice.pk, api_key=alice_other_key), Principal(user_id=alice.pk)):
        assert (await services.response_get(same, "ra"))["id"] == "ra"
    for other in (Principal(user_id=bob.pk), Principal(user_id=None, api_key=ownerless)):
        for attempt in (services.response_get(other, "ra"), services.response_delete(other, "ra"),
                        services.response_input_items(other, "ra"), services.response_cancel(other, "ra"),
                        services.history(other, "ra")):
            with pytest.raises(ApiError) as exc:
                await attempt
            assert exc.value.status == 404
    assert await _sync(lambda: StoredResponse.objects.filter(pk="ra").exists())


async def test_a_running_background_response_that_stopped_being_touched_reads_as_failed() -> None:
    key, _ = await _key("stale")
    me = Principal(user_id=None, api_key=key)
    old = timezone.now() - timedelta(seconds=services.STALE_S + 5)
    await _sync(_row, me, "fresh", status="in_progress", background=True)
    await _sync(_row, me, "stale", status="in_progress", background=True, updated_at=old)
    assert (await services.response_get(me, "fresh"))["status"] == "in_progress"
    stale = await services.response_get(me, "stale")
    assert stale["status"] == "failed" and stale["error"]["code"] == "gateway_stopped"
    with pytest.raises(ApiError) as exc:
        await services.history(me, "fresh")
    assert exc.value.status == 400 and "still in progress" in exc.value.message


def test_pruning_drops_what_is_past_retention_and_fails_what_went_stale() -> None:
    key, _ = key_make("prune")
    me = Principal(user_id=None, api_key=key)
    now = timezone.now()
    _row(me, "old", created_at=now - timedelta(days=31))
    _row(me, "recent", created_at=now - timedelta(days=29))
    _row(me, "lost", status="queued", background=True, updated_at=now - timedelta(minutes=5))
    with override_settings(OPTIMAGPT_RESPONSES_RETENTION_DAYS=30):
        assert responses_prune.apply().get() == {"responses": 1, "stopped": 1}
    assert set(StoredResponse.objects.values_list("id", flat=True)) == {"recent", "lost"}
    assert StoredResponse.objects.get(pk="lost").status == "failed"


def test_a_starting_lone_gateway_fails_every_running_response() -> None:
    key, _ = key_make("restart")
    me = Principal(user_id=None, api_key=key)
    _row(me, "running", status="in_progress", background=True)
    assert services.responses_fail_stopped() == 0, "fresh: another process may be making it"
    assert services.responses_fail_stopped(every=True) == 1
    assert StoredResponse.objects.get(pk="running").error == services.STOPPED_ERROR


async def _sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await database_sync_to_async(fn)(*args, **kwargs)


async def _key(name: str, owner: Any = None) -> Any:
    return await _sync(lambda: key_make(name, owner=owner))


async def test_a_row_that_cannot_be_written_does_not_lose_the_others(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    key, _ = await _key("writes")
    monkeypatch.setattr(services, "WRITE_RETRY_S", 0.0)
    for rid, key_id in (("good-1", key.pk), ("orphan", 10**9), ("good-2", key.pk)):  # no key 10**9: refused
        services._unsaved[rid] = StoredResponse(id=rid, api_key_id=key_id, model="m", status="completed")
    await services._write_unsaved()
    assert not services._unsaved
    stored = await _sync(lambda: set(StoredResponse.objects.values_list("id", flat=True)))
    assert stored == {"good-1", "good-2"}
    assert "could not store response orphan after 3 attempts" in caplog.text
