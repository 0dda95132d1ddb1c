"""/optima/v1/conversations, in process: paging, one with its messages, rename, delete, and privacy."""

from __future__ import annotations

import uuid

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from accounts.models import User
from chat.models import Conversation, Message
from tests.factories import PASSWORD, akey_make, auser_make

pytestmark = pytest.mark.django_db(transaction=True)

BASE = "/optima/v1/conversations"


async def _user(name: str) -> User:
    return await auser_make(name)


async def _token(name: str) -> dict[str, str]:
    response = await AsyncClient().post("/api/auth/login", {"username": name, "password": PASSWORD, "deviceId": "t"},
                                        content_type="application/json")
    assert response.status_code == 200, response.content
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def _conversation(user: User, title: str, *turns: str) -> Conversation:
    conversation = await Conversation.objects.acreate(user=user, title=title, model_id="smollm2")
    for text in turns:
        await Message.objects.acreate(conversation=conversation, role="user", content=text)
        await Message.objects.acreate(conversation=conversation, role="assistant", content=f"re: {text}")
    conversation.turn_count = len(turns)
    await conversation.asave()
    return conversation


async def test_a_chat_user_lists_own_conversations_newest_first_with_the_reference_fields() -> None:
    bob = await _user("bob")
    older = await _conversation(bob, "older", "hi")
    newer = await _conversation(bob, "newer", "one", "two")
    response = await AsyncClient().get(BASE, headers=await _token("bob"))
    assert response.status_code == 200
    body = response.json()
    assert [c["id"] for c in body["data"]] == [str(newer.id), str(older.id)]
    first = body["data"][0]
    assert set(first) == {"id", "userId", "title", "titleSource", "modelId", "turnCount", "status", "createdAt",
                          "updatedAt"}
    assert (first["userId"], first["title"], first["modelId"], first["turnCount"], first["status"]) == (
        bob.pk, "newer", "smollm2", 2, "Idle")
    assert (body["startIndex"], body["returnCount"], body["total"]) == (0, 2, 2)


async def test_paging_defaults_to_50_and_takes_at_most_200() -> None:
    bob = await _user("bob")
    await Conversation.objects.abulk_create([Conversation(user=bob, title=f"c{i}") for i in range(60)])
    headers = await _token("bob")
    client = AsyncClient()
    assert len((await client.get(BASE, headers=headers)).json()["data"]) == 50
    page = (await client.get(BASE, {"startIndex": 50, "returnCount": 20}, headers=headers)).json()
    assert (page["startIndex"], page["returnCount"], page["total"]) == (50, 10, 60)
    for bad in ({"returnCount": 201}, {"returnCount": 0}, {"startIndex": -1}, {"returnCount": "ten"}):
        response = await client.get(BASE, bad, headers=headers)
        assert response.status_code == 400, bad
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == next(iter(bad))


async def test_one_conversation_comes_with_its_messages_in_order_and_a_partial_reply_keeps_its_mark() -> None:
    bob = await _user("bob")
    conversation = await _conversation(bob, "chat", "hello")
    await Message.objects.acreate(conversation=conversation, role="assistant", content="half a rep",
                                  status=Message.Status.ERROR, error="The node was lost.")
    response = await AsyncClient().get(f"{BASE}/{conversation.id}", headers=await _token("bob"))
    assert response.status_code == 200
    body = response.json()
    assert body["systemPrompt"] == "You are a helpful assistant."
    assert [(m["role"], m["content"], m["status"]) for m in body["messages"]] == [
        ("user", "hello", "complete"), ("assistant", "re: hello", "complete"), ("assistant", "half a rep", "error")]
    assert body["messages"][-1]["error"] == "The node was lost."


async def test_rename_and_delete() -> None:
    bob = await _user("bob")
    conversation = await _conversation(bob, "old title", "hi")
    headers = await _token("bob")
    client = AsyncClient()
    response = await client.patch(f"{BASE}/{conversation.id}", {"title": "  New title "},
                                  content_type="application/json", headers=headers)
    assert response.status_code == 200 and response.json()["title"] == "New title"
    for bad in ({"title": ""}, {"title": "   "}, {"title": 5}, {"title": "x" * 201}, {"name": "x"}):
        response = await client.patch(f"{BASE}/{conversation.id}", bad, content_type="application/json",
                                      headers=headers)
        assert response.status_code == 400, bad
    assert (await Conversation.objects.aget(pk=conversation.pk)).title == "New title", "a refused rename keeps it"
    response = await client.delete(f"{BASE}/{conversation.id}", headers=headers)
    assert response.status_code == 200 and response.json()["deleted"] is True
    assert not await Conversation.objects.filter(pk=conversation.pk).aexists()
    assert not await Message.objects.filter(conversation_id=conversation.pk).aexists()


async def test_another_users_conversation_is_not_found_for_every_action_and_stays_untouched() -> None:
    bob, _eve = await _user("bob"), await _user("eve")
    secret = await _conversation(bob, "bob's secret", "my password is hunter2")
    headers = await _token("eve")
    client = AsyncClient()
    listing = (await client.get(BASE, headers=headers)).json()
    assert listing["data"] == [] and listing["total"] == 0
    for response in (await client.get(f"{BASE}/{secret.id}", headers=headers),
                     await client.patch(f"{BASE}/{secret.id}", {"title": "mine now"}, content_type="application/json",
                                        headers=headers),
                     await client.patch(f"{BASE}/{secret.id}", {"systemPrompt": "leak"},
                                        content_type="application/json", headers=headers),
                     await client.get(f"{BASE}/{secret.id}/context?modelId=smollm2", headers=headers),
                     await client.post(f"{BASE}/{secret.id}/messages", {"content": "hi", "modelId": "smollm2"},
                                       content_type="application/json", headers=headers),
                     await client.delete(f"{BASE}/{secret.id}", headers=headers)):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "conversation_not_found"
        assert "hunter2" not in response.content.decode() and "secret" not in response.content.decode()
    kept = await Conversation.objects.aget(pk=secret.pk)
    assert kept.title == "bob's secret" and await kept.messages.acount() == 2
    assert kept.system_prompt == "You are a helpful assistant."
    for missing in (str(uuid.uuid4()), "not-a-uuid", "1"):
        assert (await client.get(f"{BASE}/{missing}", headers=headers)).status_code == 404


async def test_credentials_are_required_and_a_key_without_an_owner_has_no_conversations() -> None:
    response = await AsyncClient().get(BASE)
    assert response.status_code == 401 and "error" in response.json()
    _, raw = await akey_make("service", scopes=["conversations"])
    response = await AsyncClient().get(BASE, headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


async def test_a_user_without_the_chat_permission_is_refused() -> None:
    eve = await _user("eve")
    await sync_to_async(eve.user_permissions.clear)()
    response = await AsyncClient().get(BASE, headers=await _token("eve"))
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


async def test_a_new_conversation_is_the_callers_with_the_default_system_prompt_and_bad_fields_save_nothing() -> None:
    bob = await _user("bob")
    headers = await _token("bob")
    client = AsyncClient()
    response = await client.post(BASE, {"modelId": "smollm2", "temperature": 0.2}, content_type="application/json",
                                 headers=headers)
    assert response.status_code == 201
    created = await Conversation.objects.aget(pk=response.json()["id"])
    assert (created.user_id, created.model_id, created.temperature, created.status) == (bob.pk, "smollm2", 0.2, "idle")
    assert created.system_prompt == "You are a helpful assistant."
    for bad in ({"temperature": 3}, {"temperature": "hot"}, {"userId": 99}, {"title": "x" * 201}):
        response = await client.post(BASE, bad, content_type="application/json", headers=headers)
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error"
    response = await client.post(BASE, "not json", content_type="application/json", headers=headers)
    assert response.status_code == 400
    assert await Conversation.objects.acount() == 1


async def test_a_conversation_left_running_by_a_dead_gateway_is_not_busy_for_ever(settings) -> None:
    from chat.services import turn_begin
    from optimagpt.errors import InvalidRequest

    bob = await _user("bob")
    conversation = await _conversation(bob, "stuck", "hi")
    await Conversation.objects.filter(pk=conversation.pk).aupdate(status=Conversation.Status.RUNNING)
    with pytest.raises(InvalidRequest):
        await turn_begin(conversation, content="again", model_id="m", regenerate=False)
    settings.OPTIMAGPT_REQUEST_DEADLINE_S = 0
    messages = await turn_begin(conversation, content="again", model_id="m", regenerate=False)
    assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert [m["content"] for m in messages[1:]] == ["hi", "re: hi", "again"]


async def test_settings_change_apart_from_the_title_and_bad_values_change_nothing() -> None:
    bob = await _user("bob")
    conversation = await _conversation(bob, "settings", "hi")
    headers = await _token("bob")
    client = AsyncClient()
    response = await client.patch(f"{BASE}/{conversation.id}", {"systemPrompt": "Answer in French.", "temperature": 0},
                                  content_type="application/json", headers=headers)
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["systemPrompt"], body["temperature"], body["title"], body["titleSource"]) == \
        ("Answer in French.", 0, "settings", "fallback")
    response = await client.patch(f"{BASE}/{conversation.id}", {"systemPrompt": "", "modelId": "gemma"},
                                  content_type="application/json", headers=headers)
    assert response.json()["systemPrompt"] == "" and response.json()["modelId"] == "gemma"
    for bad in ({}, {"temperature": 2.5}, {"temperature": -1}, {"systemPrompt": 5}, {"systemPrompt": "x" * 100_001},
                {"system_prompt": "x"}):
        response = await client.patch(f"{BASE}/{conversation.id}", bad, content_type="application/json",
                                      headers=headers)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", bad
    kept = await Conversation.objects.aget(pk=conversation.pk)
    assert (kept.system_prompt, kept.temperature, kept.model_id) == ("", 0, "gemma")
    renamed = await client.patch(f"{BASE}/{conversation.id}", {"title": "Mine"}, content_type="application/json",
                                 headers=headers)
    assert renamed.json()["titleSource"] == "user", "the model's title never replaces a name the user gave"


async def test_chat_preferences_are_each_users_own() -> None:
    await _user("bob"), await _user("eve")
    bob, eve = await _token("bob"), await _token("eve")
    client = AsyncClient()
    assert (await client.get("/optima/v1/preferences", headers=bob)).json() == {"expandBlocks": False}
    response = await client.patch("/optima/v1/preferences", {"expandBlocks": True}, content_type="application/json",
                                  headers=bob)
    assert response.status_code == 200 and response.json() == {"expandBlocks": True}
    assert (await client.get("/optima/v1/preferences", headers=bob)).json() == {"expandBlocks": True}
    assert (await client.get("/optima/v1/preferences", headers=eve)).json() == {"expandBlocks": False}
    for bad in ({"expandBlocks": "yes"}, {}, {"other": True}):
        response = await client.patch("/optima/v1/preferences", bad, content_type="application/json", headers=bob)
        assert response.status_code == 400, bad
    assert (await client.get("/optima/v1/preferences")).status_code == 401


@pytest.mark.parametrize(("answer", "title"), [
    ("Lighthouse Stories", "Lighthouse Stories"),
    ('"The Keeper\'s Night."\nMore text', "The Keeper's Night"),
    ("Title: Ships in Fog", "Ships in Fog"),
    ("## **Counting Numbers**", "Counting Numbers"),
    ("\n\n  ", ""),
    ("```python\ndef f(): pass\n```", ""),
    ("<think>hm</think>", ""),
    ("<think>Short, then.</think>\nBread Basics", "Bread Basics"),
    ("word " * 40, ("word " * 40)[:59].rstrip() + "…"),
])
def test_the_models_answer_becomes_a_one_line_title(answer: str, title: str) -> None:
    from chat.services import title_clean

    assert title_clean(answer) == title


async def test_search_finds_the_callers_conversations_by_title_or_by_what_was_said() -> None:
    bob, eve = await _user("bob"), await _user("eve")
    lighthouse = await _conversation(bob, "Lighthouse stories", "tell me a story")
    recipe = await _conversation(bob, "Cooking", "how do I bake LIGHTHOUSE-shaped bread?")
    await _conversation(bob, "Other", "nothing here")
    await _conversation(eve, "Eve's lighthouse", "lighthouse")
    headers = await _token("bob")
    client = AsyncClient()
    found = (await client.get(BASE + "?search=lighthouse", headers=headers)).json()
    assert [c["id"] for c in found["data"]] == [str(recipe.id), str(lighthouse.id)] and found["total"] == 2
    assert (await client.get(BASE + "?search=re: tell", headers=headers)).json()["total"] == 1, "replies count too"
    assert (await client.get(BASE + "?search=" + "x" * 201, headers=headers)).status_code == 400
