"""DATABASE_URL and REDIS_URL: two gateway processes on PostgreSQL and the Redis channel layer.

A request that arrives at gateway A is served by a node linked to gateway B.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import openai
import pytest

from tests.conftest import MODEL_ID, require_service
from tests.processes import Gateway, NodeAgent, free_port

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
