"""MCP servers we did not write: @modelcontextprotocol/server-everything (npm, Streamable HTTP) and mcp-server-time
(PyPI, stdio, started from the operator's OPTIMAGPT_MCP_STDIO_COMMANDS), used by API callers through the gateway."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime

import httpx
import openai
import pytest

from tests.processes import EVERYTHING, EverythingServer, Gateway, SimulatedNodes, free_port, mcp_server_add

pytestmark = pytest.mark.e2e


def _require_everything() -> None:
    if EVERYTHING.exists() and shutil.which("node"):
        return
    message = "server-everything is not installed (./optimagpt.sh test runs npm ci in tests/mcp)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, httpx.Client, openai.OpenAI]]:
    base = tmp_path_factory.mktemp("mcp3")
    stdio = {"time": f"{sys.executable} -m mcp_server_time --local-timezone UTC"}
    gateway = Gateway(data_dir=base, port=free_port(), OPTIMAGPT_MCP_STDIO_COMMANDS=json.dumps(stdio))
    sims = [SimulatedNodes(gateway=gateway, log_dir=base, prefix=f"sim-{model}", model=model, tool_call=tool,
                           tool_args=args)
            for model, tool, args in [("summer", "get-sum", '{"a": 2, "b": 3}'),
                                      ("clock", "get_current_time", '{"timezone": "Europe/Paris"}')]]
    try:
        gateway.start()
        for sim in sims:
            sim.start()
        browser = gateway.admin_browser("mcp3-admin", "a-long-admin-password-9")
        key = gateway.create_api_key("mcp3")
        yield gateway, browser, openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)
    finally:
        for sim in sims:
            sim.stop()
        gateway.stop()


def test_server_everything_from_npm_over_streamable_http(gateway, tmp_path) -> None:
    _require_everything()
    gw, browser, client = gateway
    server = EverythingServer(log_dir=tmp_path)
    server.start()
    try:
        added = mcp_server_add(browser, "everything", url=server.url)
        assert added["status"] == "connected", added
        assert added["tool_count"] >= 5
        reply = client.chat.completions.create(model="summer", messages=[{"role": "user", "content": "2+3?"}],
                                               tools=[{"type": "mcp", "server_label": "everything",
                                                       "allowed_tools": ["get-sum", "echo"]}])
        (call,) = reply.model_extra["mcp_calls"]
        assert call["name"] == "get-sum" and call["error"] is False
        assert "5" in call["output"] and reply.choices[0].message.content == "Tool result: " + call["output"]
    finally:
        server.stop()


def test_mcp_server_time_over_stdio_from_the_operators_list(gateway) -> None:
    gw, browser, client = gateway
    checked = mcp_server_add(browser, "clock", command="time")
    assert checked["status"] == "connected", checked
    assert checked["where"] == "stdio: time"
    reply = client.chat.completions.create(model="clock", messages=[{"role": "user", "content": "time?"}],
                                           tools=[{"type": "mcp", "server_label": "clock"}])
    (call,) = reply.model_extra["mcp_calls"]
    assert call["name"] == "get_current_time" and call["error"] is False, call["output"]
    answer = json.loads(call["output"])
    assert answer["timezone"] == "Europe/Paris"
    assert abs((datetime.fromisoformat(answer["datetime"]) - datetime.now().astimezone()).total_seconds()) < 120


def test_a_stdio_command_not_on_the_operators_list_cannot_be_added(gateway) -> None:
    gw, browser, client = gateway
    response = browser.post("/manage/mcp-servers/", data={
        "name": "shell", "command": "bash -c 'rm -rf /'", "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
    assert response.status_code == 400
    assert "shell" not in json.dumps(browser.get("/manage/mcp-servers/?format=json").json())
