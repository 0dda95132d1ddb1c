"""MCP tools for API callers, end to end: real daphne, real simulated nodes scripted to call tools, a real MCP server
(the SDK's MCPServer over Streamable HTTP, tests/mcp/server.py), and the official openai SDK as the client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL_ID
from tests.processes import (
    REPO,
    Gateway,
    McpTestServer,
    SimulatedNodes,
    free_port,
    mcp_server_add,
    mcp_server_delete,
    mcp_server_id,
    wait_for,
)

pytestmark = pytest.mark.e2e

TOKEN = "mcp-test-bearer-token-do-not-leak"
CALC = {"type": "mcp", "server_label": "calc"}


@dataclass
class Stack:
    gateway: Gateway
    server: McpTestServer
    browser: httpx.Client
    client: openai.OpenAI
    key: str
    notes: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("mcp")
    notes = base / "notes.txt"
    notes.touch()
    gateway = Gateway(data_dir=base, port=free_port(), OPTIMAGPT_MCP_MAX_ROUNDS="3", OPTIMAGPT_MCP_CALL_TIMEOUT_S="2",
                      OPTIMAGPT_MCP_RESULT_MAX_CHARS="100")
    server = McpTestServer(log_dir=base, token=TOKEN, notes=notes)
    # One scripted model per behaviour: each calls its tool (arguments as given) and then says what came back.
    sims = [SimulatedNodes(gateway=gateway, log_dir=base, prefix=f"sim-{model}", model=model, tool_call=tool,
                           tool_args=args, tool_rounds=rounds, tokens=2)
            for model, tool, args, rounds in [
                ("adder", "add", '{"a": 2, "b": 40}', 1),
                ("noter", "note", '{"text": "again"}', 100),
                ("sleeper", "sleep", '{"seconds": 10}', 1),
                ("failer", "fail", "{}", 1),
                ("bigger", "big", '{"chars": 5000}', 1),
                ("bad-args", "add", '{"a": 2, "b"', 1),
                ("plain", "", "{}", 1),
            ]]
    try:
        gateway.start()
        server.start()
        for sim in sims:
            sim.start()
        browser = gateway.admin_browser("mcp-admin", "a-long-admin-password-9")
        key = gateway.create_api_key("mcp")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)
        added = mcp_server_add(browser, "calc", url=server.url, token=TOKEN)
        assert added["status"] == "connected", added
        yield Stack(gateway, server, browser, client, key, notes)
    finally:
        for sim in sims:
            sim.stop()
        server.stop()
        gateway.stop()


def ask(stack: Stack, model: str, **extra) -> openai.types.chat.ChatCompletion:
    return stack.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "use the tool"}], tools=[CALC], **extra)


def test_the_page_lists_the_servers_tools_and_never_the_token(stack: Stack) -> None:
    page = stack.browser.get("/manage/mcp-servers/")
    assert page.status_code == 200
    assert "calc" in page.text and "Connected" in page.text and TOKEN not in page.text
    listed = stack.browser.get("/manage/mcp-servers/?format=json").json()["data"]
    (calc,) = [s for s in listed if s["name"] == "calc"]
    assert calc["tool_count"] == 6 and calc["has_token"] and TOKEN not in json.dumps(listed)
    tools = stack.browser.get(f"/manage/mcp-servers/{calc['id']}/")
    assert "Add two integers." in tools.text and "<code>add</code>" in tools.text and TOKEN not in tools.text


def test_a_request_that_names_the_server_gets_the_tools_result(stack: Stack) -> None:
    before = stack.notes.read_text()
    reply = ask(stack, "adder")
    assert reply.choices[0].message.content == "Tool result: 42"  # the sum, computed by the MCP server
    assert reply.choices[0].finish_reason == "stop"
    assert not reply.choices[0].message.tool_calls  # the gateway ran it: the client has nothing to run
    (call,) = reply.model_extra["mcp_calls"]
    assert call["server_label"] == "calc" and call["name"] == "add" and call["output"] == "42"
    assert json.loads(call["arguments"]) == {"a": 2, "b": 40} and call["error"] is False and call["round"] == 1
    # Both rounds count: the scripted call (1 prompt + 1 completion) and the answer (1 + 3 words).
    assert reply.usage.prompt_tokens == 2 and reply.usage.completion_tokens == 4
    assert stack.notes.read_text() == before
    assert TOKEN not in reply.model_dump_json() and TOKEN not in json.dumps(reply.model_extra)


def test_a_streamed_request_streams_the_answer_and_reports_the_call(stack: Stack) -> None:
    chunks = list(ask(stack, "adder", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Tool result: 42"
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    reports = [c.model_extra["mcp_calls"] for c in chunks if (c.model_extra or {}).get("mcp_calls")]
    assert len(reports) == 1 and reports[0][0]["output"] == "42"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_a_call_cut_short_by_max_tokens_is_not_run(stack: Stack) -> None:
    """A tool call whose arguments ran past max_tokens is unterminated JSON: reported as length, never run."""
    before = stack.notes.read_text()
    for stream in (False, True):
        reply = stack.client.chat.completions.create(model="noter", messages=[{"role": "user", "content": "go"}],
                                                     tools=[CALC], max_tokens=5, stream=stream)
        if stream:
            chunks = list(reply)
            assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
                ["length"]
            assert not any((c.model_extra or {}).get("mcp_calls") for c in chunks)
            assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
        else:
            assert reply.choices[0].finish_reason == "length"
            assert not reply.choices[0].message.tool_calls and not reply.model_extra.get("mcp_calls")
    assert stack.notes.read_text() == before  # the note tool never ran


def test_the_round_limit_ends_the_reply_with_its_reason(stack: Stack) -> None:
    before = stack.notes.read_text().count("again")
    reply = ask(stack, "noter")
    assert reply.choices[0].finish_reason == "mcp_round_limit"
    assert "stopped after 3 rounds" in reply.choices[0].message.content
    assert len(reply.model_extra["mcp_calls"]) == 2  # rounds 1 and 2 ran their call; round 3 hit the limit
    assert stack.notes.read_text().count("again") - before == 2  # the tool really ran, twice
    assert reply.usage.completion_tokens == 3


def test_a_streamed_reply_at_the_round_limit_streams_the_note(stack: Stack) -> None:
    chunks = list(ask(stack, "noter", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[The gateway stopped after 3 rounds of MCP tool calls (OPTIMAGPT_MCP_MAX_ROUNDS).]"
    assert sum(1 for c in chunks if (c.model_extra or {}).get("mcp_calls")) == 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == ["mcp_round_limit"]


def test_a_tool_past_its_timeout_goes_back_to_the_model_as_an_error(stack: Stack) -> None:
    started = time.monotonic()
    reply = ask(stack, "sleeper")
    assert time.monotonic() - started < 8  # the 2 s timeout, not the tool's 10 s
    assert reply.choices[0].message.content == "Tool result: The tool did not answer within 2 s."
    assert reply.model_extra["mcp_calls"][0]["error"] is True
    assert ask(stack, "adder").choices[0].message.content == "Tool result: 42"  # the session still works


def test_a_failing_tool_a_huge_result_and_bad_arguments_are_results_not_errors(stack: Stack) -> None:
    failed = ask(stack, "failer")
    assert failed.model_extra["mcp_calls"][0]["error"] is True
    assert failed.choices[0].message.content.startswith("Tool result: ")
    big = ask(stack, "bigger").model_extra["mcp_calls"][0]["output"]
    assert big == "x" * 100 + "\n[truncated by the gateway: 100 of 5000 characters shown]"
    bad = ask(stack, "bad-args")
    assert bad.model_extra["mcp_calls"][0]["error"] is True
    assert "not a JSON object" in bad.choices[0].message.content


def test_a_client_tool_of_the_same_name_stays_the_clients(stack: Stack) -> None:
    own = {"type": "function", "function": {"name": "calc_add", "description": "the client's own",
                                            "parameters": {"type": "object"}}}
    reply = stack.client.chat.completions.create(model="adder", messages=[{"role": "user", "content": "go"}],
                                                 tools=[CALC, own])
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.name == "calc_add"
    assert reply.model_extra.get("mcp_calls") == []


def test_requests_that_name_no_server_are_untouched(stack: Stack) -> None:
    reply = stack.client.chat.completions.create(model="adder", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "t0 t1 "
    assert "mcp_calls" not in (reply.model_extra or {})


@pytest.mark.parametrize(("tool", "code"), [
    ({"type": "mcp", "server_label": "calc", "server_url": "http://169.254.169.254/"}, None),
    ({"type": "mcp", "server_label": "nobody"}, "mcp_server_not_found"),
    ({"type": "mcp", "server_label": "calc", "require_approval": "always"}, None),
])
def test_what_cannot_run_is_refused_in_openais_error_form(stack: Stack, tool: dict, code: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        stack.client.chat.completions.create(model="adder", messages=[{"role": "user", "content": "go"}],
                                             tools=[tool])
    assert exc.value.status_code == 400 and exc.value.body["type"] == "invalid_request_error"
    if code:
        assert exc.value.body["code"] == code


def test_a_server_killed_mid_call_ends_the_call_cleanly_and_is_marked_failed(stack: Stack) -> None:
    doomed = McpTestServer(log_dir=stack.gateway.data_dir, transport="streamable-http")
    doomed.start()
    try:
        assert mcp_server_add(stack.browser, "doomed", url=doomed.url)["status"] == "connected"
        result: dict = {}

        def call() -> None:
            result["reply"] = stack.client.chat.completions.create(
                model="sleeper", messages=[{"role": "user", "content": "go"}],
                tools=[{"type": "mcp", "server_label": "doomed"}])

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1.0)  # the sleep tool is running
        doomed.kill()
        caller.join(30)
        assert not caller.is_alive()
        reply = result["reply"]
        assert reply.choices[0].finish_reason == "stop"
        assert reply.model_extra["mcp_calls"][0]["error"] is True

        def failed() -> bool:
            listed = stack.browser.get("/manage/mcp-servers/?format=json").json()["data"]
            return any(s["name"] == "doomed" and s["status"] == "failed" for s in listed)

        stack.browser.post(f"/manage/mcp-servers/{mcp_server_id(stack.browser, 'doomed')}/refresh/",
                           headers={"X-CSRFToken": stack.browser.cookies["csrftoken"]})
        wait_for(failed, 10, "the killed server to show Failed")
        # Its tools are no longer offered: the scripted model finds nothing to call and just answers.
        again = stack.client.chat.completions.create(model="sleeper", messages=[{"role": "user", "content": "go"}],
                                                     tools=[{"type": "mcp", "server_label": "doomed"}])
        assert again.model_extra["mcp_calls"] == [] and again.choices[0].message.content == "t0 t1 "
    finally:
        doomed.stop()


def test_a_deleted_server_is_gone_at_once(stack: Stack) -> None:
    other = McpTestServer(log_dir=stack.gateway.data_dir)
    other.start()
    try:
        assert mcp_server_add(stack.browser, "brief", url=other.url)["status"] == "connected"
        reply = stack.client.chat.completions.create(model="adder", messages=[{"role": "user", "content": "go"}],
                                                     tools=[{"type": "mcp", "server_label": "brief"}])
        assert reply.choices[0].message.content == "Tool result: 42"
        mcp_server_delete(stack.browser, mcp_server_id(stack.browser, "brief"))
        with pytest.raises(openai.BadRequestError):
            stack.client.chat.completions.create(model="adder", messages=[{"role": "user", "content": "go"}],
                                                 tools=[{"type": "mcp", "server_label": "brief"}])
    finally:
        other.stop()


def test_servers_that_cannot_be_used_fail_with_the_reason_in_words(stack: Stack) -> None:
    wrong = mcp_server_add(stack.browser, "wrong-token", url=stack.server.url, token="not-the-token")
    assert wrong["status"] == "failed" and wrong["error"] == "401: the server refused the bearer token"
    none = mcp_server_add(stack.browser, "no-token", url=stack.server.url)
    assert none["error"] == "401: the server needs a bearer token"
    refused = mcp_server_add(stack.browser, "nobody-home", url=f"http://127.0.0.1:{free_port()}/mcp")
    assert refused["error"] == "refused: nothing accepted the connection at this address"
    not_mcp = mcp_server_add(stack.browser, "not-mcp", url=stack.gateway.url + "/no-such-page/")
    assert not_mcp["status"] == "failed" and not_mcp["error"].startswith("not an MCP server")
    page = stack.browser.get("/manage/mcp-servers/")
    assert "state-failed" in page.text and "refused the bearer token" in page.text and "not-the-token" not in page.text


def test_the_page_refuses_what_it_cannot_save(stack: Stack) -> None:
    for name, url, message in [
        ("bad_name", stack.server.url, "letters, digits and hyphens"),
        ("metadata", "http://169.254.169.254/latest/", "link-local"),
        ("metadata2", "http://[::ffff:169.254.169.254]/mcp", "link-local"),
        ("metadata3", "http://metadata.google.internal/mcp", "link-local"),
        ("creds", "http://user:pw@127.0.0.1/mcp", "credentials"),
        ("calc", stack.server.url, "exists already"),
    ]:
        response = stack.browser.post("/manage/mcp-servers/", data={
            "name": name, "url": url, "csrfmiddlewaretoken": stack.browser.cookies["csrftoken"]})
        assert response.status_code == 400 and message in response.text, (name, response.text[-2000:])


def test_only_mcp_management_sees_the_page(stack: Stack) -> None:
    user = stack.gateway.http()
    assert user.get("/manage/mcp-servers/").status_code == 302  # to the login page
    subprocess.run([sys.executable, "manage.py", "create_user", "plain-user", "--type", "user"], cwd=REPO,
                   env=stack.gateway.env, input="a-long-user-password-9\n", text=True, check=True,
                   capture_output=True)
    user.get("/login/")
    user.post("/login/", data={"username": "plain-user", "password": "a-long-user-password-9",
                               "csrfmiddlewaretoken": user.cookies["csrftoken"]})
    assert user.get("/manage/mcp-servers/").status_code == 403
    assert user.get("/manage/mcp-servers/?format=json").status_code == 403
    assert "/manage/mcp-servers/" not in user.get("/").text  # no link to it either
    pk = mcp_server_id(stack.browser, "calc")
    csrf = {"csrfmiddlewaretoken": user.cookies["csrftoken"]}
    assert user.get(f"/manage/mcp-servers/{pk}/").status_code == 403
    for action, extra in (("refresh", {}), ("toggle", {"toggle": "api"}), ("delete", {})):
        assert user.post(f"/manage/mcp-servers/{pk}/{action}/", data={**csrf, **extra}).status_code == 403, action
    assert user.post("/manage/mcp-servers/", data={**csrf, "name": "mine", "url": "http://127.0.0.1:9/"}) \
        .status_code == 403
    listed = stack.browser.get("/manage/mcp-servers/?format=json").json()["data"]
    assert any(s["name"] == "calc" and s["api_enabled"] for s in listed)  # nothing the user sent changed it
    assert not any(s["name"] == "mine" for s in listed)


def test_the_real_model_calls_an_mcp_tool_when_forced(gateway: Gateway, node, api_key: str,
                                                      tmp_path: Path) -> None:
    """SmolLM2 on llama.cpp, with tool_choice naming the MCP tool: the gateway runs it and continues the reply."""
    server = McpTestServer(log_dir=tmp_path)
    server.start()
    browser = gateway.admin_browser("mcp-real-admin", "a-long-admin-password-9")
    try:
        assert mcp_server_add(browser, "realcalc", url=server.url)["status"] == "connected"
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        # SmolLM2 may go on repeating inside the argument's string until max_tokens cuts it (the penalties make
        # that rare): such a call is not run (finish_reason length, no mcp_calls); the next seed is tried.
        for seed in range(1, 6):
            reply = client.chat.completions.create(
                model=MODEL_ID, max_tokens=128, seed=seed, presence_penalty=1.5, frequency_penalty=1.0,
                messages=[{"role": "user", "content": "Echo the word banana with the tool."}],
                tools=[{"type": "mcp", "server_label": "realcalc", "allowed_tools": ["echo"]}],
                tool_choice={"type": "function", "function": {"name": "realcalc_echo"}})
            if reply.model_extra.get("mcp_calls"):
                break
            assert reply.choices[0].finish_reason == "length" and not reply.choices[0].message.tool_calls
        (call,) = reply.model_extra["mcp_calls"][:1]
        assert call["name"] == "echo" and call["round"] == 1
        arguments = json.loads(call["arguments"])
        assert call["output"] == arguments["text"]  # the echo server really answered with what the model sent
        assert reply.usage.prompt_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length",
                                                                                     "mcp_round_limit")
    finally:
        mcp_server_delete(browser, mcp_server_id(browser, "realcalc"))
        server.stop()


def test_a_keys_mcp_servers_limit_and_defaults_hold(stack: Stack) -> None:
    limited = stack.gateway.manage("create_api_key", "--name", "limited", "--mcp-servers", "elsewhere").strip()
    client = openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key=limited, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="adder", messages=[{"role": "user", "content": "go"}], tools=[CALC])
    assert exc.value.body["code"] == "mcp_server_not_found"
    defaulted = stack.gateway.manage("create_api_key", "--name", "defaulted", "--default-mcp-servers", "calc").strip()
    client = openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key=defaulted, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="adder", messages=[{"role": "user", "content": "go"}])
    assert reply.choices[0].message.content == "Tool result: 42"  # the key's default server, unasked


def test_the_answer_says_the_gateways_own_time_in_server_timing(stack: Stack) -> None:
    raw = stack.client.chat.completions.with_raw_response.create(
        model="adder", messages=[{"role": "user", "content": "go"}], tools=[CALC])
    metrics = dict(part.strip().split(";")[:2] for part in raw.headers["server-timing"].split(","))
    own, tools = float(metrics["mcp"].removeprefix("dur=")), float(metrics["tools"].removeprefix("dur="))
    assert 0 < own < 1000 and 0 < tools < 10_000
    assert raw.parse().model_extra["mcp_calls"][0]["duration_ms"] <= tools + 0.1  # the call, within the tools


def test_a_redirect_to_another_origin_is_not_followed_and_the_token_stays(stack: Stack) -> None:
    """The redirect points to a real MCP server that accepts the token: had the token been carried there,
    the server would show Connected."""
    lure = McpTestServer(log_dir=stack.gateway.data_dir, redirect_to=stack.server.url.replace("127.0.0.1",
                                                                                               "localhost"))
    lure.start()
    try:
        added = mcp_server_add(stack.browser, "lure", url=lure.url, token=TOKEN)
        assert added["status"] == "failed" and "redirects elsewhere" in added["error"], added
    finally:
        lure.stop()


def test_while_a_tool_runs_the_nodes_slot_serves_others(stack: Stack) -> None:
    """The sleeper's node takes one request at a time; its MCP request spends 2 s in a tool (the timeout),
    and plain requests to the same node are answered meanwhile."""
    result: dict = {}
    caller = threading.Thread(target=lambda: result.update(reply=ask(stack, "sleeper")))
    started = time.monotonic()
    caller.start()
    time.sleep(0.5)
    served_at = []
    for _ in range(3):
        reply = stack.client.chat.completions.create(model="sleeper", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "t0 t1 "
        served_at.append(time.monotonic() - started)
    caller.join(30)
    assert result["reply"].model_extra["mcp_calls"][0]["error"] is True  # it did sleep past its timeout
    assert max(served_at) < 2.0, served_at  # all three before the tool's 2 s were up


def test_the_token_never_reaches_the_gateways_log(stack: Stack) -> None:
    assert TOKEN not in stack.gateway.log()


def test_an_sse_only_server_is_reached_through_the_fallback(stack: Stack) -> None:
    old = McpTestServer(log_dir=stack.gateway.data_dir, transport="sse")
    old.start()
    try:
        added = mcp_server_add(stack.browser, "old-sse", url=old.url)
        assert added["status"] == "connected" and added["tool_count"] == 6, added
        reply = stack.client.chat.completions.create(model="adder", messages=[{"role": "user", "content": "go"}],
                                                     tools=[{"type": "mcp", "server_label": "old-sse"}])
        assert reply.choices[0].message.content == "Tool result: 42"
    finally:
        old.stop()
