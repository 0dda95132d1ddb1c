"""Sending in a conversation against a real gateway and node with SmolLM2: the reply streams and is saved,
closing the stream stops the node and keeps the partial reply, regenerate replaces the last reply."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import MODEL_ID

pytestmark = pytest.mark.e2e

PASSWORD = "conversation-user-password-1"


def _chat_user(gateway, name: str) -> dict[str, str]:
    return gateway.chat_user(name, PASSWORD)


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_reply_streams_is_saved_and_can_be_regenerated(gateway, node) -> None:
    headers = _chat_user(gateway, "carol")
    base = gateway.url + "/optima/v1/conversations"
    conversation = httpx.post(base, headers=headers, json={"modelId": MODEL_ID, "temperature": 0.0}).json()
    with httpx.stream("POST", f"{base}/{conversation['id']}/messages", headers=headers, timeout=60,
                      json={"content": "Say hello to   the\nworld."}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    deltas = [e["content"] for e in events if e["type"] == "delta"]
    kinds = [e["type"] for e in events]
    assert len(deltas) >= 1 and kinds[-2:] == ["done", "title"], kinds
    saved = events[-2]["message"]
    assert saved["role"] == "assistant" and saved["status"] == "complete" and saved["content"] == "".join(deltas)

    # The model titled the conversation after its first reply, replacing the first words of the message.
    got = httpx.get(f"{base}/{conversation['id']}", headers=headers).json()
    assert got["title"] == events[-1]["title"] and got["titleSource"] == "model", got
    assert 0 < len(got["title"]) <= 60 and "\n" not in got["title"]
    assert got["turnCount"] == 1 and got["status"] == "Idle"
    assert [(m["role"], m["status"]) for m in got["messages"]] == [("user", "complete"), ("assistant", "complete")]

    with httpx.stream("POST", f"{base}/{conversation['id']}/messages", headers=headers, timeout=60,
                      json={"regenerate": True}) as response:
        events = _events(response)
    assert events[-1]["type"] == "done", "titled once: a regenerated reply does not title it again"
    got = httpx.get(f"{base}/{conversation['id']}", headers=headers).json()
    assert got["turnCount"] == 1 and [m["role"] for m in got["messages"]] == ["user", "assistant"]
    assert got["messages"][-1]["id"] == events[-1]["message"]["id"], "the new reply replaced the old"


def test_closing_the_stream_stops_the_node_and_keeps_the_partial_reply_marked(gateway, node, api_key) -> None:
    headers = _chat_user(gateway, "dave")
    base = gateway.url + "/optima/v1/conversations"
    conversation = httpx.post(base, headers=headers, json={"modelId": MODEL_ID}).json()
    received = []
    with httpx.stream("POST", f"{base}/{conversation['id']}/messages", headers=headers, timeout=60,
                      json={"content": "Write a very long story about a lighthouse keeper."}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append(json.loads(line[6:]))
            if len(received) >= 5:
                break  # Stop: the client closes the connection mid-reply
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = httpx.get(f"{base}/{conversation['id']}", headers=headers).json()
        if len(got["messages"]) == 2:
            break
        time.sleep(0.1)
    reply = got["messages"][-1]
    assert reply["status"] == "stopped" and got["status"] == "Idle"
    partial = "".join(e["content"] for e in received if e["type"] == "delta")
    assert reply["content"].startswith(partial) and len(partial) > 0
    # The node is free again: a one-token request is answered at once.
    started = time.monotonic()
    answer = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                        json={"model": MODEL_ID, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
                        timeout=30)
    assert answer.status_code == 200 and time.monotonic() - started < 5


def test_sending_needs_content_or_regenerate_and_a_model(gateway, node) -> None:
    headers = _chat_user(gateway, "erin")
    base = gateway.url + "/optima/v1/conversations"
    conversation = httpx.post(base, headers=headers, json={}).json()
    url = f"{base}/{conversation['id']}/messages"
    for body, param in (({"content": "  "}, "content"), ({"content": "x", "regenerate": True}, "content"),
                        ({"content": "hello"}, "modelId"), ({"regenerate": True, "modelId": MODEL_ID}, "regenerate")):
        response = httpx.post(url, headers=headers, json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param
    response = httpx.post(url, headers=headers, json={"content": "hello", "modelId": "nobody-has-this"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    got = httpx.get(f"{base}/{conversation['id']}", headers=headers).json()
    assert [m["content"] for m in got["messages"]] == ["hello"] and got["status"] == "Error", \
        "the user's turn is kept when no model can answer, ready to be sent again"


def test_the_context_window_is_counted_by_the_models_tokenizer_part_by_part(gateway, node, model_path) -> None:
    from llama_cpp import Llama

    headers = _chat_user(gateway, "fiona")
    base = gateway.url + "/optima/v1/conversations"
    system = "You are a lighthouse keeper who answers in one short sentence."
    conversation = httpx.post(base, headers=headers, json={"modelId": MODEL_ID, "temperature": 0.0,
                                                           "systemPrompt": system}).json()
    with httpx.stream("POST", f"{base}/{conversation['id']}/messages", headers=headers, timeout=60,
                      json={"content": "What do you see at night?"}) as response:
        reply = [e for e in _events(response) if e["type"] == "done"][0]["message"]["content"]

    counted = httpx.get(f"{base}/{conversation['id']}/context", headers=headers, timeout=30)
    assert counted.status_code == 200, counted.text
    counts = counted.json()
    # SmolLM2's tokenizer loaded here, apart from the node: what the node's counts are checked against.
    vocabulary = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    window = [m for m in httpx.get(gateway.url + "/optima/v1/models", headers=headers).json()["chat_models"]
              if m["id"] == MODEL_ID][0]["ctx_max"]

    def tokens(text: str) -> int:
        return len(vocabulary.tokenize(text.encode(), add_bos=False, special=False))

    assert counts["countedWith"] == "tokenizer" and counts["modelId"] == MODEL_ID
    assert counts["system"] == tokens(system) and counts["tools"] == 0
    assert counts["user"] == tokens("What do you see at night?") and counts["assistant"] == tokens(reply)
    assert counts["template"] > 0  # turn markers and the reply's opening
    assert counts["used"] == sum(counts[p] for p in ("system", "tools", "user", "assistant", "template"))
    assert counts["window"] == window and counts["free"] == counts["window"] - counts["used"]

    # A new system prompt applies from the next message, and the count follows it at once.
    longer = system + " You also know every ship that ever passed the rocks, by name and by flag."
    changed = httpx.patch(f"{base}/{conversation['id']}", headers=headers, json={"systemPrompt": longer})
    assert changed.status_code == 200 and changed.json()["systemPrompt"] == longer
    assert httpx.get(f"{base}/{conversation['id']}/context", headers=headers).json()["system"] == tokens(longer)
    httpx.patch(f"{base}/{conversation['id']}", headers=headers, json={"systemPrompt": ""})
    assert httpx.get(f"{base}/{conversation['id']}/context", headers=headers).json()["system"] == 0

    # Nobody else can count someone's conversation (or learn that it exists).
    other = httpx.get(f"{base}/{conversation['id']}/context", headers=_chat_user(gateway, "gregor"))
    assert other.status_code == 404 and other.json()["error"]["code"] == "conversation_not_found"
