"""The gateway's HTTP and WebSocket edges against a real daphne: hosts, origins, slow bodies, unknown paths, docs."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.processes import Gateway, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("edge")
    gateway = Gateway(data_dir=data_dir, port=free_port(), OPTIMAGPT_BODY_TIMEOUT_S="2",
                      OPTIMAGPT_ACCESS_LOG=str(data_dir / "access.log"))
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_the_api_paths_hold_to_allowed_hosts(edge: Gateway) -> None:
    for path in ("/v1/models", "/optima/v1/capabilities"):
        response = httpx.get(edge.url + path, headers={"Host": "evil.example"}, timeout=10)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_host"


def test_unknown_api_paths_answer_in_openai_form(edge: Gateway) -> None:
    key = edge.create_api_key("edges")
    for method, path in (("GET", "/v1/nothing-here"), ("POST", "/v1/chat/complete"), ("GET", "/optima/v1/nope"),
                         ("GET", "/v1")):
        response = httpx.request(method, edge.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "unknown_url"
    page = httpx.get(edge.url + "/no-such-page/", timeout=10)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")


def test_the_access_log_has_a_line_per_request_and_no_key(edge: Gateway) -> None:
    """Asked for (OPTIMAGPT_ACCESS_LOG), daphne's access log is written; Twisted's second one is gone."""
    key = edge.create_api_key("access-log")
    for path in ("/v1/models", "/v1/no-such-thing-logged"):
        httpx.get(edge.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    log = edge.data_dir / "access.log"

    def logged() -> str:
        return log.read_text() if log.exists() else ""

    deadline = time.monotonic() + 10
    while "/v1/no-such-thing-logged" not in logged() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = logged().splitlines()
    assert any('"GET /v1/models" 200' in line for line in lines), lines
    assert any('"GET /v1/no-such-thing-logged" 404' in line for line in lines), lines
    assert key not in logged() and key.split("-")[-1][-12:] not in logged()


def test_a_body_that_trickles_in_is_timed_out(edge: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n")
        started = time.monotonic()
        answer = b""
        for _ in range(60):  # a byte a second, for as long as the gateway lets it
            try:
                conn.sendall(b"{")
            except OSError:
                break
            conn.settimeout(1.0)
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer or b"Content-Length" in answer
        assert time.monotonic() - started < 10


def test_websockets_open_only_from_this_gateways_own_origin(edge: Gateway) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def hello(origin: str) -> str:
        async with connect(f"ws://127.0.0.1:{edge.port}/ws/node/", origin=origin, open_timeout=10) as ws:
            return str(await asyncio.wait_for(ws.recv(), 10))

    assert '"hello"' in asyncio.run(hello(f"http://127.0.0.1:{edge.port}"))
    for origin in (f"http://127.0.0.1:{edge.port + 1}", "http://127.0.0.1", "http://evil.example",
                   f"http://localhost:{edge.port}", "null"):
        with pytest.raises(InvalidStatus):
            asyncio.run(hello(origin))


def test_the_docs_page_runs_from_our_own_files_under_a_policy(edge: Gateway, browser) -> None:
    response = httpx.get(edge.url + "/docs", timeout=10)
    assert response.status_code == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "cdn" not in response.text.lower() and "https://" not in response.text
    requested: list[str] = []
    page = browser.new_page()
    page.on("request", lambda request: requested.append(request.url))
    refusals: list[str] = []
    page.on("console", lambda message: refusals.append(message.text) if "Content Security Policy" in message.text
            else None)
    page.goto(edge.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
    assert "OptimaGPT" in page.inner_text(".swagger-ui .info .title")
    assert page.locator(".opblock").count() > 10, "the operations are listed"
    assert all(url.startswith(edge.url) or url.startswith("data:") for url in requested), requested
    assert not refusals, refusals
