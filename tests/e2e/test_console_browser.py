"""The node console in real headless Chromium, against a running gateway and a node agent in listen mode.

The wizard adds the listening node; its colour turns grey on deactivation and green again on activation, and
red when the node process is killed; the graphs receive points; the log filter hides and shows levels.
Screenshots of the Nodes page and the node page go to test-artifacts/.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.tls import fingerprint_of_file
from tests.conftest import ARTIFACTS, MODEL_ID
from tests.processes import Gateway, NodeAgent, free_port

pytestmark = pytest.mark.e2e

PASSWORD = "a-long-console-password"
TIMEOUT_MS = 30_000


@pytest.fixture
def console_stack(models_dir: Path, tmp_path: Path) -> Iterator[tuple[Gateway, NodeAgent, int]]:
    (tmp_path / "gw").mkdir()
    (tmp_path / "node").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    gateway.start()
    port = free_port()
    agent = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / "node", name="console-node",
                      extra_args=("--listen", f"127.0.0.1:{port}", "--metrics-interval", "0.5"))
    agent.start()
    try:
        yield gateway, agent, port
    finally:
        agent.stop()
        gateway.stop()


def test_the_wizard_adds_a_node_whose_colour_graphs_and_log_follow_it_live(
        browser, console_stack: tuple[Gateway, NodeAgent, int], tmp_path: Path) -> None:
    gateway, agent, port = console_stack
    gateway.admin_browser("console-admin", PASSWORD).close()  # creates the admin
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    # Every page runs under a strict Content-Security-Policy: nothing on them may need inline script or style.
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        page.goto(gateway.url + "/login/")
        page.fill("input[name=username]", "console-admin")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(gateway.url + "/")  # an Admin may chat: the front page is OptimaChat
        page.click("header >> text=Nodes")
        page.wait_for_url(gateway.url + "/manage/nodes/")

        # New Node: a suggested name, refreshed; the address and port; Next verifies; Finish saves.
        page.click("text=New Node")
        suggested = page.input_value("#id_name")
        assert suggested and page.input_value("#id_port") == "8022"
        page.click("#new-name")
        page.wait_for_function(f"() => document.getElementById('id_name').value !== {suggested!r}")
        page.fill("#id_name", "browser-node")
        page.fill("#id_host", "127.0.0.1")
        page.fill("#id_port", str(port))
        page.click("button[value=verify]")
        page.wait_for_selector("#verified")
        assert fingerprint_of_file(tmp_path / "node" / "node-cert.pem") in page.inner_text("#verified")
        page.click("button[value=finish]")
        page.wait_for_url(gateway.url + "/manage/nodes/")
        row = page.locator("tr", has_text="browser-node")
        agent.wait_for_model(MODEL_ID)
        row.locator(".dot-green").wait_for()

        # Deactivated: grey. Activated again: green once the gateway has dialed it again (live, no reload).
        row.locator("button", has_text="Deactivate").click()
        page.wait_for_url(gateway.url + "/manage/nodes/")
        page.locator("tr", has_text="browser-node").locator(".dot-grey").wait_for()
        page.locator("tr", has_text="browser-node").locator("button", has_text="Activate").click()
        page.wait_for_url(gateway.url + "/manage/nodes/")
        page.locator("tr", has_text="browser-node").locator(".dot-green").wait_for()
        page.screenshot(path=str(ARTIFACTS / "nodes.png"), full_page=True)

        # The node page: graphs receive points as the node reports them.
        page.locator("#nodes a", has_text="browser-node").click()
        page.wait_for_function("() => document.body.dataset.console === 'live'")
        points = int(page.get_attribute("canvas[data-graph=cpu]", "data-points") or 0)
        page.wait_for_function(
            f"() => Number(document.querySelector('canvas[data-graph=cpu]').dataset.points) >= {points + 3}")
        assert "absent" in page.inner_text("[data-now=gpu]"), "no GPU here: shown as absent"

        # The log filter hides and shows levels.
        page.wait_for_selector("#log div[data-level=INFO]")
        info_lines = page.locator("#log div[data-level=INFO]")
        assert info_lines.first.is_visible()
        page.uncheck("input[data-level=INFO]")
        assert not info_lines.first.is_visible()
        assert page.locator("#log div[data-level=DEBUG]").count() == 0 or \
            not page.locator("#log div[data-level=DEBUG]").first.is_visible(), "Debug starts hidden"
        page.check("input[data-level=INFO]")
        assert info_lines.first.is_visible()
        page.screenshot(path=str(ARTIFACTS / "node.png"), full_page=True)

        # The node process dies: red, live.
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        page.wait_for_selector("#node-status.dot-red")

        # Delete asks first (a declared confirmation, no inline script): dismissed keeps it, accepted deletes it.
        page.once("dialog", lambda d: d.dismiss())
        page.click("form[data-confirm] button.danger")
        assert page.locator("h1", has_text="browser-node").count() == 1
        page.once("dialog", lambda d: d.accept())
        page.click("form[data-confirm] button.danger")
        page.wait_for_url(gateway.url + "/manage/nodes/")
        assert page.locator("tr", has_text="browser-node").count() == 0
        assert not refused, refused
    finally:
        page.close()
