"""Sending in a conversation against a real gateway and node with SmolLM2: the reply streams and is saved,
closing the stream stops the node and keeps the partial reply, regenerate replaces the last reply."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import MODEL_ID
from tests.processes import REPO

pytestmark = pytest.mark.e2e

PASSWORD = "conversation-user-password-1"


def _chat_user(gateway, name: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    subprocess.run([sys.executable, "manage.py", "create_user", name, "--type", "user"], cwd=REPO, env=gateway.env,
                   input=PASSWORD + "\n", text=True, check=True, capture_output=True)
    response = httpx.post(gateway.url + "/api/auth/login", json={"username": name, "password": PASSWORD,
                                                                 "deviceId": "e2e"})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_reply_streams_is_saved_and_can_be_regenerated(gateway, node) -> None:  # type: ignore[no-untyped-def]
    headers = _chat_user(gateway, "carol")
    base = gateway.url + "/optima/v1/conversations"
    conversation = httpx.post(base, headers=headers, json={"modelId": MODEL_ID, "temperature": 0.0}).json()
    with httpx.stream("POST", f"{base}/{conversation['id']}/messages", headers=headers, timeout=60,
                      json={"content": "Say hello to   the\nworld."}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    deltas = [e["content"] for e in events if e["type"] == "delta"]
    assert len(deltas) >= 1 and events[-1]["type"] == "done"
    saved = events[-1]["message"]
    assert saved["role"] == "assistant" and saved["status"] == "complete" and saved["content"] == "".join(deltas)

    got = httpx.get(f"{base}/{conversation['id']}", headers=headers).json()
    assert got["title"] == "Say hello to the world." and got["turnCount"] == 1 and got["status"] == "Idle"
    assert [(m["role"], m["status"]) for m in got["messages"]] == [("user", "complete"), ("assistant", "complete")]

    with httpx.stream("POST", f"{base}/{conversation['id']}/messages", headers=headers, timeout=60,
                      json={"regenerate": True}) as response:
        events = _events(response)
    assert events[-1]["type"] == "done"
    got = httpx.get(f"{base}/{conversation['id']}", headers=headers).json()
    assert got["turnCount"] == 1 and [m["role"] for m in got["messages"]] == ["user", "assistant"]
    assert got["messages"][-1]["id"] == events[-1]["message"]["id"], "the new reply replaced the old"


def test_closing_the_stream_stops_the_node_and_keeps_the_partial_reply_marked(gateway, node, api_key) -> None:  # type: ignore[no-untyped-def]
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


def test_sending_needs_content_or_regenerate_and_a_model(gateway, node) -> None:  # type: ignore[no-untyped-def]
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
