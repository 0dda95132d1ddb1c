"""A remote OpenAI-compatible upstream registered as an executor, against a real second server.

The upstream is the session's gateway with its node (a real OpenAI-compatible
server, started by the test run); a second gateway with no node of its own
serves the model only through it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL_ID
from tests.processes import REPO, Gateway, NodeAgent, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    gateway = Gateway(data_dir=tmp_path_factory.mktemp("front"), port=free_port())
    gateway.start()
    subprocess.run([sys.executable, "manage.py", "create_user", "boss", "--type", "admin"], cwd=REPO,
                   env=gateway.env, input="a-long-admin-password\n", text=True, check=True, capture_output=True)
    key = gateway.manage("create_api_key", "--name", "boss", "--user", "boss", "--scopes", "inference",
                         "management").strip()
    try:
        yield gateway, key
    finally:
        gateway.stop()


def _api(gateway: Gateway, key: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, gateway.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                         **kwargs)


def test_a_remote_upstream_is_listed_and_routed_like_a_local_executor(
        front: tuple[Gateway, str], gateway: Gateway, node: NodeAgent, api_key: str) -> None:
    front_gw, admin_key = front
    created = _api(front_gw, admin_key, "POST", "/optima/v1/executors", json={
        "name": "gateway-a", "model_id": "cloud-smol", "base_url": gateway.url + "/v1",
        "upstream_model": MODEL_ID, "api_key": api_key, "description": "SmolLM2 through another gateway"})
    assert created.status_code == 201, created.text
    assert created.json()["state"] == "online" and created.json()["kind"] == "remote"
    assert created.json()["has_api_key"] is True and api_key not in created.text

    client = openai.OpenAI(base_url=front_gw.url + "/v1", api_key=admin_key, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["cloud-smol"]
    listed = _api(front_gw, admin_key, "GET", "/optima/v1/models").json()
    assert listed["chat_models"] == [{"id": "cloud-smol", "name": "gateway-a", "owned_by": "127.0.0.1",
                                      "ctx_max": None, "description": "SmolLM2 through another gateway"}]

    reply = client.chat.completions.create(model="cloud-smol", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    assert reply.model == "cloud-smol" and reply.choices[0].message.role == "assistant"
    assert 0 < reply.usage.completion_tokens <= 4

    stream = client.chat.completions.create(model="cloud-smol", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reply.choices[0].message.content and text.startswith(reply.choices[0].message.content), \
        "same model, same greedy tokens: 6 streamed begin with the 4 answered before"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    legacy = client.completions.create(model="cloud-smol", prompt="Once upon a time", max_tokens=3)
    assert legacy.choices[0].text and legacy.usage.completion_tokens <= 3
    vectors = client.embeddings.create(model="cloud-smol", input=["one", "two"])
    assert [len(v.embedding) for v in vectors.data] == [576, 576]

    # An upstream's refusal of the request comes back as the client's error, in OpenAI's form.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="cloud-smol", messages=[{"role": "user", "content": "Hi"}],
                                       tool_choice={"type": "function", "function": {"name": "missing"}},
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert api_key not in front_gw.log(), "the upstream's key never reaches a log"
    listing = _api(front_gw, admin_key, "GET", "/optima/v1/executors")
    assert api_key not in listing.text


def test_a_remote_upstream_answers_the_responses_api_through_chat_completions(
        front: tuple[Gateway, str], gateway: Gateway, node: NodeAgent, api_key: str) -> None:
    """The gateway speaks chat completions to the upstream (here another gateway, which could be any
    OpenAI-compatible server) and Responses to its client, history and streaming included."""
    front_gw, admin_key = front
    if _api(front_gw, admin_key, "GET", "/v1/models").json()["data"] == []:
        assert _api(front_gw, admin_key, "POST", "/optima/v1/executors", json={
            "name": "gateway-a", "model_id": "cloud-smol", "base_url": gateway.url + "/v1",
            "upstream_model": MODEL_ID, "api_key": api_key}).status_code == 201
    client = openai.OpenAI(base_url=front_gw.url + "/v1", api_key=admin_key, max_retries=0, timeout=60)
    first = client.responses.create(model="cloud-smol", input="Hi", max_output_tokens=4, temperature=0)
    assert first.model == "cloud-smol" and first.output_text and 0 < first.usage.output_tokens <= 4
    second = client.responses.create(model="cloud-smol", input="And again?", previous_response_id=first.id,
                                     max_output_tokens=4, temperature=0)
    assert second.usage.input_tokens > first.usage.input_tokens, "the first turn went along"
    with client.responses.stream(model="cloud-smol", input="Hi", max_output_tokens=6, temperature=0,
                                 truncation="auto") as stream:
        events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.startswith(first.output_text), "same model, same greedy tokens"
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.usage.output_tokens <= 6


def test_an_upstream_that_refuses_the_key_is_marked_failed_with_the_reason_and_not_routed(
        front: tuple[Gateway, str], gateway: Gateway, node: NodeAgent) -> None:
    front_gw, admin_key = front
    wrong_key = "sk-optima-" + "w" * 40
    created = _api(front_gw, admin_key, "POST", "/optima/v1/executors", json={
        "name": "wrong-key", "model_id": "refused-model", "base_url": gateway.url + "/v1",
        "upstream_model": MODEL_ID, "api_key": wrong_key})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["state"] == "failed" and "refused the key" in body["error"] and wrong_key not in created.text
    response = _api(front_gw, admin_key, "POST", "/v1/chat/completions",
                    json={"model": "refused-model", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
    # Fixed with the right key, it goes online.
    assert wrong_key not in front_gw.log()
    duplicate = _api(front_gw, admin_key, "POST", "/optima/v1/executors", json={
        "name": "wrong-key", "model_id": "x", "base_url": gateway.url + "/v1"})
    assert duplicate.status_code == 409
    bad = _api(front_gw, admin_key, "POST", "/optima/v1/executors", json={
        "name": "bad-url", "model_id": "x", "base_url": "not a url"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "base_url"


def test_a_remote_upstream_is_updated_and_deleted_through_the_api(
        front: tuple[Gateway, str], gateway: Gateway, node: NodeAgent, api_key: str, tmp_path: Path) -> None:
    front_gw, admin_key = front
    executors = _api(front_gw, admin_key, "GET", "/optima/v1/executors").json()["data"]
    refused = next(e for e in executors if e["key"] == "wrong-key")
    fixed = _api(front_gw, admin_key, "PATCH", f"/optima/v1/executors/{refused['id']}", json={"api_key": api_key})
    assert fixed.status_code == 200 and fixed.json()["state"] == "online", fixed.text
    client = openai.OpenAI(base_url=front_gw.url + "/v1", api_key=admin_key, max_retries=0, timeout=60)
    assert client.chat.completions.create(model="refused-model", max_tokens=1,
                                          messages=[{"role": "user", "content": "Hi"}]).choices
    stopped = _api(front_gw, admin_key, "POST", f"/optima/v1/executors/{refused['id']}/stop")
    assert stopped.json()["state"] == "offline"
    assert "refused-model" not in {m.id for m in client.models.list().data}
    assert _api(front_gw, admin_key, "DELETE", f"/optima/v1/executors/{refused['id']}").status_code == 204
    listed = _api(front_gw, admin_key, "GET", "/optima/v1/executors").json()["data"]
    assert refused["id"] not in {e["id"] for e in listed}


@pytest.mark.parametrize("host", ["169.254.169.254", "[::ffff:169.254.169.254]", "2852039166",
                                  "0251.0376.0251.0376", "[fe80::1]", "100.100.100.200"])
def test_link_local_and_metadata_addresses_are_refused_in_any_notation(front: tuple[Gateway, str], host: str) -> None:
    front_gw, admin_key = front
    response = _api(front_gw, admin_key, "POST", "/optima/v1/executors", json={
        "name": f"ssrf-{host}", "model_id": "ssrf", "base_url": f"http://{host}/latest/meta-data"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "base_url"
    names = {e["key"] for e in _api(front_gw, admin_key, "GET", "/optima/v1/executors").json()["data"]}
    assert f"ssrf-{host}" not in names


def test_credentials_in_the_url_are_refused_and_never_echoed(front: tuple[Gateway, str], gateway: Gateway) -> None:
    front_gw, admin_key = front
    url = gateway.url.replace("http://", "http://admin:hunter2@") + "/v1"
    response = _api(front_gw, admin_key, "POST", "/optima/v1/executors", json={
        "name": "creds", "model_id": "creds", "base_url": url})
    assert response.status_code == 400 and "hunter2" not in response.text


class _Recorder:
    """An HTTP server on loopback that records the Authorization header of each request and answers 404."""

    def __init__(self) -> None:
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.headers.get("Authorization"))
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_the_stored_key_never_goes_to_a_new_host_and_probes_say_only_unreachable(
        front: tuple[Gateway, str], gateway: Gateway, node: NodeAgent, api_key: str) -> None:
    front_gw, admin_key = front
    created = _api(front_gw, admin_key, "POST", "/optima/v1/executors", json={
        "name": "moving", "model_id": "moving", "base_url": gateway.url + "/v1", "upstream_model": MODEL_ID,
        "api_key": api_key})
    assert created.status_code == 201 and created.json()["state"] == "online", created.text
    recorder = _Recorder()
    try:
        moved = _api(front_gw, admin_key, "PATCH", f"/optima/v1/executors/{created.json()['id']}",
                     json={"base_url": recorder.url + "/v1"})
        assert moved.status_code == 400 and moved.json()["error"]["param"] == "api_key"
        assert recorder.seen == [], "nothing was sent to the new host"
        moved = _api(front_gw, admin_key, "PATCH", f"/optima/v1/executors/{created.json()['id']}",
                     json={"base_url": recorder.url + "/v1", "api_key": "sk-the-new-hosts-key"})
        assert moved.status_code == 200 and recorder.seen == ["Bearer sk-the-new-hosts-key"]
        # A closed port, a server that is no OpenAI API, a port that speaks no HTTP: one answer for all.
        with socket_listening() as raw_port:
            errors = set()
            for url in (f"http://127.0.0.1:{free_port()}/v1", recorder.url + "/v1", f"http://127.0.0.1:{raw_port}/v1"):
                probed = _api(front_gw, admin_key, "PATCH", f"/optima/v1/executors/{created.json()['id']}",
                              json={"base_url": url, "api_key": "k"})
                assert probed.status_code == 200 and probed.json()["state"] == "failed"
                errors.add(probed.json()["error"])
        assert len(errors) == 1 and errors.pop().startswith("unreachable")
    finally:
        recorder.close()
        _api(front_gw, admin_key, "DELETE", f"/optima/v1/executors/{created.json()['id']}")


@contextlib.contextmanager
def socket_listening() -> Iterator[int]:
    """A TCP port that accepts connections and closes them at once (no HTTP)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
                connection.close()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()
