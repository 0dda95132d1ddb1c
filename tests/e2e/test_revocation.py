"""Revoking an API key on the gateway ends its requests at once: one streaming, one queued behind it."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import MODEL_ID, NO_END

pytestmark = pytest.mark.e2e

ADMIN_PASSWORD = "revocation-admin-password-1"


def test_revoking_a_key_ends_its_streaming_and_queued_requests(gateway, node, api_key) -> None:
    browser = gateway.admin_browser("revoker", ADMIN_PASSWORD)
    doomed = gateway.create_api_key("doomed")
    headers = {"Authorization": f"Bearer {doomed}"}
    long_body = {"model": MODEL_ID, "stream": True, "max_tokens": 3000, "logit_bias": NO_END,
                 "messages": [{"role": "user", "content": "Write a very long story."}]}
    stream_lines: list[str] = []
    queued: dict[str, httpx.Response] = {}

    def stream() -> None:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=headers, json=long_body,
                          timeout=60) as response:
            stream_lines.extend(line for line in response.iter_lines() if line)

    def wait_in_queue() -> None:
        queued["r"] = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=60,
                                 json={**long_body, "stream": False})

    streamer = threading.Thread(target=stream)
    streamer.start()
    deadline = time.monotonic() + 30
    while len(stream_lines) < 2:  # tokens are flowing
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    time.sleep(0.5)  # the second request now generates beside the first (one batch on the node), unanswered

    gateway.revoke_api_key(browser, "doomed")
    revoked_at = time.monotonic()
    streamer.join(10)
    waiter.join(10)
    assert not streamer.is_alive() and not waiter.is_alive()
    assert time.monotonic() - revoked_at < 5
    assert stream_lines[-1] != "data: [DONE]"
    assert json.loads(stream_lines[-1].removeprefix("data: "))["error"]["code"] == "api_key_revoked"
    assert queued["r"].status_code == 401 and queued["r"].json()["error"]["code"] == "api_key_revoked"
    # The node stopped both: another key is served at once.
    started = time.monotonic()
    other = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": MODEL_ID, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]},
                       timeout=30)
    assert other.status_code == 200 and time.monotonic() - started < 2
