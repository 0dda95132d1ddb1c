"""MCP in real headless Chromium: an admin adds a server on /manage/mcp-servers/ and sees it connect, its tools and
a failed one's reason; a chat user chooses its tools for a conversation, a scripted model uses one, and the run's
status line and the expandable call show, also after a reload. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ARTIFACTS
from tests.e2e.test_chat_browser import PASSWORD, _signed_in
from tests.processes import REPO, Gateway, McpTestServer, SimulatedNodes, free_port

pytestmark = pytest.mark.e2e

XSS = '<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>'


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, McpTestServer]]:
    base = tmp_path_factory.mktemp("mcp-browser")
    gateway = Gateway(data_dir=base, port=free_port())
    server = McpTestServer(log_dir=base)
    sims = [SimulatedNodes(gateway=gateway, log_dir=base, model="toolsmith", prefix="toolsmith", tool_call="add",
                           tool_args='{"a": 19, "b": 23}', token_rate=20),
            SimulatedNodes(gateway=gateway, log_dir=base, model="echoer", prefix="echoer", tool_call="echo",
                           tool_args=json.dumps({"text": XSS}))]
    try:
        gateway.start()
        server.start()
        for sim in sims:
            sim.start()
        for name, kind in (("mcpadmin", "admin"), ("chatuser", "user")):
            subprocess.run([sys.executable, "manage.py", "create_user", name, "--type", kind], cwd=REPO,
                           env=gateway.env, input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        yield gateway, server
    finally:
        for sim in sims:
            sim.stop()
        server.stop()
        gateway.stop()


def test_an_admin_adds_a_server_and_a_chat_user_uses_its_tool(browser, site) -> None:
    gateway, server = site
    problems: list[str] = []
    context, page = _signed_in(browser, gateway, "mcpadmin", problems, width=1280)
    try:
        page.click("text=MCP servers")
        page.wait_for_url("**/manage/mcp-servers/")
        page.fill("input[name=name]", "calc")
        page.fill("input[name=url]", server.url)
        page.click("#new-mcp-server button[type=submit]")
        row = page.locator("#mcp-servers tr", has_text="calc")
        row.locator(".state-connected", has_text="Connected").wait_for()  # the page's script asked for the check
        assert row.locator("[data-field=tool_count]").inner_text() == "6"
        page.fill("input[name=name]", "nowhere")
        page.fill("input[name=url]", f"http://127.0.0.1:{free_port()}/mcp")
        page.click("#new-mcp-server button[type=submit]")
        failed = page.locator("#mcp-servers tr", has_text="nowhere")
        failed.locator(".state-failed", has_text="Failed").wait_for()
        assert "nothing accepted the connection" in failed.locator("[data-field=error]").inner_text()
        page.screenshot(path=str(ARTIFACTS / "mcp-servers.png"), full_page=True)
        # Chat off and on again, as an admin would toggle it.
        row.locator("form:has(input[value=chat]) button").click()
        page.locator("#mcp-servers tr", has_text="calc").locator("form:has(input[value=chat]) button",
                                                                  has_text="Off").wait_for()
        page.locator("#mcp-servers tr", has_text="calc").locator("form:has(input[value=chat]) button").click()
        page.locator("#mcp-servers tr", has_text="calc").locator("form:has(input[value=chat]) button",
                                                                  has_text="On").wait_for()
        page.locator("#mcp-servers tr", has_text="calc").locator("[data-field=tool_count]").click()
        page.locator("#mcp-tools td", has_text="Add two integers.").wait_for()
        assert not problems, problems
    finally:
        context.close()

    problems = []
    context, page = _signed_in(browser, gateway, "chatuser", problems, width=1280)
    try:
        page.goto(gateway.url + "/")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#model option')].some(o => o.value === 'toolsmith')")
        page.click("#new-chat")
        page.wait_for_function("() => document.querySelector('#title').textContent === 'New chat'")
        page.select_option("#model", "toolsmith")
        page.click("#tools-toggle")
        page.locator("#mcp-tools label", has_text="calc (all 6 tools)").wait_for()
        assert "127.0.0.1" not in page.inner_text("#tools-panel")  # a chat user never sees where a server is
        page.locator("#mcp-tools input[data-choice=calc]").check()
        page.locator("#tools-saved", has_text="Saved").wait_for()
        assert page.inner_text("#tools-toggle") == "Tools (1)"
        page.fill("#input", "What is 19 + 23?")
        page.keyboard.press("Enter")
        page.locator("#run-status", has_text="Using tools (1)").wait_for()
        page.locator("#send:not([hidden])").wait_for(timeout=60_000)
        reply = page.locator("#messages li.assistant").last
        assert reply.locator(".content").inner_text().strip() == "Tool result: 42"
        assert page.inner_text("#run-status").startswith("Used 1 tool in ")
        call = reply.locator("details.tool-call")
        assert "calc · add" in call.locator("summary").inner_text()
        call.locator("summary").click()
        assert call.locator("pre").nth(0).inner_text() == '{"a": 19, "b": 23}'
        assert call.locator("pre").nth(1).inner_text() == "42"
        page.screenshot(path=str(ARTIFACTS / "mcp-chat.png"), full_page=True)
        page.reload()
        page.wait_for_function("() => document.querySelector('#messages li.assistant')")
        again = page.locator("#messages li.assistant").last.locator("details.tool-call")
        assert "calc · add" in again.locator("summary").inner_text()
        again.locator("summary").click()  # folded after a reload, like the reply's other blocks; it opens
        assert again.locator("pre").nth(1).inner_text() == "42"
        assert page.inner_text("#tools-toggle") == "Tools (1)"
        assert not problems, problems
    finally:
        context.close()


def test_a_tools_output_is_shown_as_text_never_run(browser, site) -> None:
    """The echo tool hands back markup; the call's block and the reply show it as text, and nothing runs."""
    gateway, server = site
    problems: list[str] = []
    context, page = _signed_in(browser, gateway, "chatuser", problems, width=1280)
    try:
        page.goto(gateway.url + "/")
        page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'echoer')")
        page.click("#new-chat")
        page.wait_for_function("() => document.querySelector('#title').textContent === 'New chat'")
        page.select_option("#model", "echoer")
        page.click("#tools-toggle")
        page.locator("#mcp-tools input[data-choice=calc_echo]").check()
        page.locator("#tools-saved", has_text="Saved").wait_for()
        page.fill("#input", "Echo this.")
        page.keyboard.press("Enter")
        page.locator("#send:not([hidden])").wait_for(timeout=60_000)
        call = page.locator("#messages li.assistant").last.locator("details.tool-call")
        call.locator("summary").click()
        assert call.locator("pre").nth(1).inner_text() == XSS
        assert page.locator("#messages img").count() == 0
        assert page.evaluate("() => window.__xss") is None
        assert not problems, problems
    finally:
        context.close()
