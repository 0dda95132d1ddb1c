"""DATABASE_URL and REDIS_URL: two gateway processes on PostgreSQL and the Redis channel layer.

A request that arrives at gateway A is served by a node linked to gateway B.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import openai
import pytest

from tests.conftest import MODEL_ID, require_service
from tests.processes import REPO, Gateway, NodeAgent, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    import psycopg

    server = require_service("OPTIMAGPT_TEST_DATABASE_URL")
    name = "optimagpt_e2e_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    import redis

    url = require_service("OPTIMAGPT_TEST_REDIS_URL")
    redis.Redis.from_url(url, socket_timeout=5).ping()
    return url


def test_a_request_at_gateway_a_is_served_by_a_node_linked_to_gateway_b(
    database_url: str, redis_url: str, models_dir: Path, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    gateways = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        gateways.append(Gateway(data_dir=tmp_path / name, port=free_port(), **env))
    gateway_a, gateway_b = gateways
    (tmp_path / "node").mkdir()
    agent = NodeAgent(gateway=gateway_b, models_dir=models_dir, state_dir=tmp_path / "node")
    try:
        gateway_a.start()
        gateway_b.start(migrate=False)
        agent.start()
        agent.wait_for_model(MODEL_ID)
        assert "linked from" in gateway_b.log() and "linked from" not in gateway_a.log()

        client = openai.OpenAI(base_url=gateway_a.url + "/v1", api_key=gateway_a.create_api_key("scale-out"),
                               max_retries=0, timeout=60)
        assert MODEL_ID in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
        assert reply.usage.completion_tokens == 4
        chunks = [c.choices[0].delta.content for c in client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True)
            if c.choices[0].delta.content]
        assert len(chunks) >= 2
        embedding = client.embeddings.create(model=MODEL_ID, input=["one", "two"])
        assert [d.index for d in embedding.data] == [0, 1]
        assert not [line for line in gateway_a.log().splitlines() if "ERROR" in line]
    finally:
        assert agent.stop() == 0
        for gateway in gateways:
            gateway.stop()


def test_a_key_revoked_through_gateway_b_stops_at_once_on_gateway_a(
    database_url: str, redis_url: str, models_dir: Path, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "OPTIMAGPT_API_KEY_CACHE_S": "3600"}
    for name in ("a", "b", "node"):
        (tmp_path / name).mkdir()
    gateway_a = Gateway(data_dir=tmp_path / "a", port=free_port(), **env)
    gateway_b = Gateway(data_dir=tmp_path / "b", port=free_port(), **env)
    agent = NodeAgent(gateway=gateway_a, models_dir=models_dir, state_dir=tmp_path / "node")
    try:
        gateway_a.start()
        gateway_b.start(migrate=False)
        agent.start()
        agent.wait_for_model(MODEL_ID)
        raw = gateway_a.create_api_key("doomed")
        headers = {"Authorization": f"Bearer {raw}"}
        assert gateway_a.http().get("/v1/models", headers=headers).status_code == 200  # cached on A for an hour
        lines: list[str] = []

        def stream() -> None:
            with gateway_a.http() as client, client.stream("POST", "/v1/chat/completions", headers=headers, json={
                    "model": MODEL_ID, "stream": True, "max_tokens": 3000, "logit_bias": {"2": -100},
                    "messages": [{"role": "user", "content": "Write a very long story."}]}, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        streamer = threading.Thread(target=stream)
        streamer.start()
        deadline = time.monotonic() + 30
        while len(lines) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        subprocess.run([sys.executable, "manage.py", "create_user", "boss", "--type", "admin"], cwd=REPO,
                       env=gateway_b.env, input="a-long-admin-password-9\n", text=True, check=True,
                       capture_output=True)
        key_id = gateway_b.manage("shell", "--no-imports", "-c",
                                  "from accounts.models import ApiKey; print(ApiKey.objects.get(name='doomed').pk)")
        with gateway_b.http() as browser:
            browser.get("/login/")
            browser.post("/login/", data={"username": "boss", "password": "a-long-admin-password-9",
                                          "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
            revoked = browser.post(f"/manage/api-keys/{key_id.strip()}/revoke/",
                                   data={"csrfmiddlewaretoken": browser.cookies["csrftoken"]})
            assert revoked.status_code == 302
        streamer.join(10)
        assert not streamer.is_alive()
        assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "api_key_revoked"
        assert gateway_a.http().get("/v1/models", headers=headers).status_code == 401
    finally:
        agent.stop()
        gateway_a.stop()
        gateway_b.stop()
