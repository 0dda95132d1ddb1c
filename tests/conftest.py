"""Shared fixtures: the real default model, and real gateway and node-agent processes.

The live stack is started once per test session: daphne on a free port with
its own SQLite file, and a node agent serving SmolLM2 to it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from node_agent.default_model import ensure_default_model
from tests.processes import Gateway, NodeAgent, free_port

if TYPE_CHECKING:
    from accounts.models import User

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "smollm2-135m-instruct-q4_1"
# SmolLM2 ends a reply with any of three tokens (0, 2 and 4 are end-of-generation in its vocabulary): as a
# logit_bias this makes a reply run to its max_tokens. Banning 2 alone let a rare draw end on another.
NO_END = {"0": -100, "2": -100, "4": -100}


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ensure_default_model(REPO / "models")


@pytest.fixture(scope="session")
def models_dir(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding only the default model, so tests can add files freely."""
    folder = tmp_path_factory.mktemp("models")
    try:
        os.link(model_path, folder / model_path.name)  # same file system: no copy needed
    except OSError:
        shutil.copyfile(model_path, folder / model_path.name)
    return folder


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(data_dir=tmp_path_factory.mktemp("gateway"), port=free_port())
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def node(gateway: Gateway, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    agent = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path_factory.mktemp("node"))
    agent.start()
    try:
        agent.wait_for_model(MODEL_ID)
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="session")
def api_key(gateway: Gateway) -> str:
    return gateway.create_api_key("tests")


@pytest.fixture
def client(gateway: Gateway, node: NodeAgent, api_key: str):
    import openai

    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def require_service(variable: str) -> str:
    """The URL of a service a test needs: skip without it on a laptop, fail without it in CI."""
    url = os.environ.get(variable)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{variable} is not set, and CI must run this test")
        pytest.skip(f"{variable} is not set")
    return url


@pytest.fixture
def redis_url() -> str:
    """The test Redis (OPTIMAGPT_TEST_REDIS_URL), checked to answer."""
    import redis

    url = require_service("OPTIMAGPT_TEST_REDIS_URL")
    redis.Redis.from_url(url, socket_timeout=5).ping()
    return url


@pytest.fixture(autouse=True)
def _fresh_counters() -> None:
    """Rate-limit counters are per process; each test starts with none (database ids repeat between tests)."""
    import accounts.ratelimit

    accounts.ratelimit._counter = None


BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def browser():
    """Debian's headless Chromium driven by Playwright: skipped on a laptop without it, a failure in CI.

    Per test, not per session: Playwright's sync API keeps an event loop running in this thread while it
    is open, and the async tests that come later need the thread's loop to themselves.
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, and CI must run the browser tests "
                        "(./optimagpt.sh test installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
        try:
            yield instance
        finally:
            instance.close()


# -- people, for the in-process tests (tests/factories.py makes them) ------------------------------
@pytest.fixture
def admin(db: None) -> User:
    from tests.factories import user_make  # Django is set up by now, not yet when this file is read

    return user_make("ada", admin=True)


@pytest.fixture
def member(db: None) -> User:
    """A User: OptimaChat only."""
    from tests.factories import user_make

    return user_make("bob")


@pytest.fixture
def outsider(db: None) -> User:
    """Someone with an account but not one permission."""
    from tests.factories import user_make

    user = user_make("eve")
    user.user_permissions.clear()
    return user
