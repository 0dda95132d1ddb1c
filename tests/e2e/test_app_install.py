"""OptimaChat as an installable app, in real headless Chromium: the manifest and the service worker load under
the page's Content-Security-Policy, Chromium reports the page installable, the worker caches the shell and
never an API answer, and an installed app without the gateway shows the offline page."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BROWSER_FLAGS
from tests.e2e.test_chat_browser import PASSWORD, TIMEOUT_MS, choose_temperature
from tests.processes import REPO, Gateway

pytestmark = pytest.mark.e2e


def test_optimachat_is_installable_and_its_worker_caches_the_shell_only(browser, gateway: Gateway, node,
                                                                       tmp_path: Path) -> None:
    subprocess.run([sys.executable, "manage.py", "create_user", "installer", "--type", "user"], cwd=REPO,
                   env=gateway.env, input=PASSWORD + "\n", text=True, check=True, capture_output=True)
    with gateway.http() as http:
        manifest = http.get("/manifest.webmanifest")
        assert manifest.headers["Content-Type"] == "application/manifest+json"
        assert manifest.json()["display"] == "standalone" and manifest.json()["start_url"] == "/"
        worker = http.get("/sw.js")
        assert worker.headers["Content-Type"].startswith("text/javascript")
        assert worker.headers["Cache-Control"] == "no-cache"
    problems: list[str] = []
    # A profile on disk: Chromium never offers to install an app from an incognito context (Playwright's
    # new_context), and says so as the installability error "in-incognito".
    context = browser.browser_type.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=shutil.which("chromium"), args=BROWSER_FLAGS,
        viewport={"width": 1280, "height": 900})
    page = context.pages[0] if context.pages else context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    try:
        page.goto(gateway.url + "/login/")
        page.fill("input[name=username]", "installer")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        page.wait_for_function("() => [...document.querySelectorAll('#model option')].length > 0")
        page.evaluate("() => navigator.serviceWorker.ready.then(() => true)")
        page.reload()  # now controlled by the worker
        page.wait_for_function("() => navigator.serviceWorker.controller !== null")
        cdp = context.new_cdp_session(page)
        errors = cdp.send("Page.getInstallabilityErrors")["installabilityErrors"]
        assert errors == [], errors
        manifest = cdp.send("Page.getAppManifest")
        assert not manifest.get("errors"), manifest.get("errors")
        # A chat turn through the API, then: what the worker's cache holds.
        choose_temperature(page, "0")
        page.fill("#input", "Say hi")
        page.keyboard.press("Enter")
        page.locator("#messages li.assistant").last.wait_for()
        page.locator("#send:not([hidden])").wait_for(timeout=60_000)
        cached = page.evaluate("""async () => {
            const urls = [];
            for (const name of await caches.keys()) {
                for (const request of await (await caches.open(name)).keys()) urls.push(new URL(request.url).pathname);
            }
            return urls;
        }""")
        assert "/offline/" in cached and "/static/js/chat.js" in cached
        assert not [u for u in cached if u.startswith(("/v1", "/optima", "/api", "/chat/token"))], cached
        offline = page.evaluate("() => caches.match('/offline/').then(r => r.text())")
        assert "installer" not in offline and "csrfmiddlewaretoken" not in offline  # nobody's data in the cache
        # Without the network, a navigation shows the offline page from the cache.
        context.set_offline(True)
        page.goto(gateway.url + "/")
        assert "OptimaChat is offline" in page.inner_text("h1")
        context.set_offline(False)
        assert not problems, problems
    finally:
        context.close()
