"""DATABASE_URL and REDIS_URL: two gateway processes on PostgreSQL and the Redis channel layer.

A request that arrives at gateway A is served by a node linked to gateway B.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL_ID, NO_END
from tests.processes import Gateway, NodeAgent, free_port

pytestmark = pytest.mark.e2e


@contextmanager
def two_gateways_and_a_node(tmp_path: Path, models_dir: Path, env: dict[str, str],
                            node_on: str) -> Iterator[tuple[Gateway, Gateway]]:
    """Gateways A and B on the same PostgreSQL and Redis, and a node linked to `node_on` ("a" or "b")."""
    for name in ("a", "b", "node"):
        (tmp_path / name).mkdir()
    gateway_a = Gateway(data_dir=tmp_path / "a", port=free_port(), **env)
    gateway_b = Gateway(data_dir=tmp_path / "b", port=free_port(), **env)
    agent = NodeAgent(gateway=gateway_a if node_on == "a" else gateway_b, models_dir=models_dir,
                      state_dir=tmp_path / "node")
    try:
        gateway_a.start()
        gateway_b.start(migrate=False)
        agent.start()
        agent.wait_for_model(MODEL_ID)
        yield gateway_a, gateway_b
    finally:
        assert agent.stop() == 0
        gateway_a.stop()
        gateway_b.stop()


def test_a_request_at_gateway_a_is_served_by_a_node_linked_to_gateway_b(
    database_url: str, redis_url: str, models_dir: Path, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    with two_gateways_and_a_node(tmp_path, models_dir, env, node_on="b") as (gateway_a, gateway_b):
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


def test_a_key_revoked_through_gateway_b_stops_at_once_on_gateway_a(
    database_url: str, redis_url: str, models_dir: Path, tmp_path: Path
) -> None:
    # A key cache of an hour: only the broadcast can tell gateway A in time.
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "OPTIMAGPT_API_KEY_CACHE_S": "3600"}
    with two_gateways_and_a_node(tmp_path, models_dir, env, node_on="a") as (gateway_a, gateway_b):
        raw = gateway_a.create_api_key("doomed")
        headers = {"Authorization": f"Bearer {raw}"}
        assert gateway_a.http().get("/v1/models", headers=headers).status_code == 200  # now cached on A
        lines: list[str] = []

        def stream() -> None:
            with gateway_a.http() as client, client.stream("POST", "/v1/chat/completions", headers=headers, json={
                    "model": MODEL_ID, "stream": True, "max_tokens": 3000, "logit_bias": NO_END,
                    "messages": [{"role": "user", "content": "Write a very long story."}]}, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        streamer = threading.Thread(target=stream)
        streamer.start()
        deadline = time.monotonic() + 30
        while len(lines) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        gateway_b.revoke_api_key(gateway_b.admin_browser("boss", "a-long-admin-password-9"), "doomed")
        streamer.join(10)
        assert not streamer.is_alive()
        assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "api_key_revoked"
        assert gateway_a.http().get("/v1/models", headers=headers).status_code == 401


def test_gateway_a_counts_the_requests_gateway_b_has_on_a_node(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Slots are shared through Redis: with gateway B holding both slots of a node, gateway A queues instead of
    sending a third request (here, with no queue allowed, it refuses it with 429 and Retry-After)."""
    from tests.processes import SimulatedNodes

    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    gateway_a = Gateway(data_dir=tmp_path / "a", port=free_port(), OPTIMAGPT_QUEUE_MAX_LENGTH="0", **env)
    gateway_b = Gateway(data_dir=tmp_path / "b", port=free_port(), **env)
    # One node, one process, two requests at once (OPTIMAGPT_REQUESTS_PER_SLOT=2); each takes 3 s.
    node = SimulatedNodes(gateway=gateway_b, log_dir=tmp_path, count=1, delay_s=3)
    try:
        gateway_a.start()
        gateway_b.start(migrate=False)
        node.start()
        key = gateway_a.create_api_key("shared")
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "sim", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        deadline = time.monotonic() + 30
        while not httpx.get(gateway_a.url + "/v1/models", headers=headers).json()["data"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        answers: list[int] = []
        holders = [threading.Thread(target=lambda: answers.append(
            httpx.post(gateway_b.url + "/v1/chat/completions", headers=headers, json=body, timeout=30).status_code))
            for _ in range(2)]
        for thread in holders:
            thread.start()
        time.sleep(1)  # B's counts reach A within OPTIMAGPT_SHARED_LOAD_INTERVAL_S (0.1 s)
        refused = httpx.post(gateway_a.url + "/v1/chat/completions", headers=headers, json=body, timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["Retry-After"]) >= 1
        for thread in holders:
            thread.join(30)
        assert answers == [200, 200]
        time.sleep(0.5)
        served = httpx.post(gateway_a.url + "/v1/chat/completions", headers=headers, json=body, timeout=30)
        assert served.status_code == 200, served.text
    finally:
        node.stop()
        gateway_a.stop()
        gateway_b.stop()


def test_an_mcp_server_deleted_on_gateway_a_is_gone_on_gateway_b_at_once(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Gateway B keeps the MCP catalogue in memory; the delete made through A reaches it through Redis, not
    after its cache lifetime (30 s)."""
    from tests.processes import McpTestServer, SimulatedNodes, mcp_server_add, mcp_server_delete

    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    gateway_a = Gateway(data_dir=tmp_path / "a", port=free_port(), **env)
    gateway_b = Gateway(data_dir=tmp_path / "b", port=free_port(), **env)
    node = SimulatedNodes(gateway=gateway_b, log_dir=tmp_path, model="adder", tool_call="add",
                          tool_args='{"a": 1, "b": 2}')
    server = McpTestServer(log_dir=tmp_path)
    try:
        gateway_a.start()
        gateway_b.start(migrate=False)
        node.start()
        server.start()
        browser = gateway_a.admin_browser("boss", "a-long-admin-password-9")
        pk = mcp_server_add(browser, "calc", url=server.url)["id"]
        key = gateway_a.create_api_key("mcp")
        client = openai.OpenAI(base_url=gateway_b.url + "/v1", api_key=key, max_retries=0, timeout=30)
        ask = {"model": "adder", "messages": [{"role": "user", "content": "go"}],
               "tools": [{"type": "mcp", "server_label": "calc"}]}
        assert client.chat.completions.create(**ask).choices[0].message.content == "Tool result: 3"
        mcp_server_delete(browser, pk)
        time.sleep(1.0)
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(**ask)
        assert exc.value.body["code"] == "mcp_server_not_found"
    finally:
        server.stop()
        node.stop()
        gateway_b.stop()
        gateway_a.stop()


def test_a_background_response_is_polled_and_cancelled_through_the_other_gateway(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Stored on PostgreSQL: a background response running on A, polled and cancelled through B."""
    from tests.processes import SimulatedNodes, wait_for

    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    gateway_a = Gateway(data_dir=tmp_path / "a", port=free_port(), **env)
    gateway_b = Gateway(data_dir=tmp_path / "b", port=free_port(), **env)
    node = SimulatedNodes(gateway=gateway_b, log_dir=tmp_path, model="sim", reply="ok " * 80, token_rate=10.0)
    try:
        gateway_a.start()
        gateway_b.start(migrate=False)
        node.start()
        key = gateway_a.create_api_key("responses")
        a, b = (openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=60)
                for g in (gateway_a, gateway_b))
        queued = a.responses.create(model="sim", input="long", background=True)
        wait_for(lambda: b.responses.retrieve(queued.id).output, 20, "output polled through B", interval_s=0.2)
        assert b.responses.cancel(queued.id).status == "cancelled"
        time.sleep(3)  # A's task notices at its next heartbeat (every 2 s) and stops
        stopped = a.responses.retrieve(queued.id)
        assert stopped.status == "cancelled"
        length = len(stopped.output_text)
        time.sleep(2)
        assert len(a.responses.retrieve(queued.id).output_text) == length, "nothing more was generated"
        assert length < len("ok " * 80)
        assert not [line for line in gateway_a.log().splitlines() if "ERROR" in line]
    finally:
        node.stop()
        gateway_b.stop()
        gateway_a.stop()


def test_a_response_chain_alternating_between_the_gateways_is_rebuilt_whole(
    database_url: str, redis_url: str, models_dir: Path, tmp_path: Path
) -> None:
    """Each turn continues, at once, one the other gateway stored (one recursive query on PostgreSQL): the
    model is given exactly the turns sent by hand."""
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    with two_gateways_and_a_node(tmp_path, models_dir, env, node_on="b") as (gateway_a, gateway_b):
        key = gateway_a.create_api_key("chain")
        a, b = (openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=60)
                for g in (gateway_a, gateway_b))
        previous, turns = None, []
        for turn in range(4):
            client = a if turn % 2 == 0 else b
            reply = client.responses.create(model=MODEL_ID, input=f"Say the number {turn}.", max_output_tokens=4,
                                            temperature=0, **({"previous_response_id": previous} if previous else {}))
            turns += [{"role": "user", "content": f"Say the number {turn}."},
                      {"role": "assistant", "content": reply.output_text}]
            previous = reply.id
        by_hand = a.responses.create(model=MODEL_ID, input=[*turns[:-1]], max_output_tokens=4, temperature=0,
                                     store=False)
        assert reply.usage.input_tokens == by_hand.usage.input_tokens
        assert reply.output_text == by_hand.output_text


def test_settings_changed_on_gateway_a_apply_on_gateway_b_and_both_share_traces_and_logs(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A value saved on A's Configuration page reaches B through Redis within seconds; traces and log lines
    made by B show in A's Diagnostics (one shared, bounded store)."""
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    gateway_a = Gateway(data_dir=tmp_path / "a", port=free_port(), **env)
    gateway_b = Gateway(data_dir=tmp_path / "b", port=free_port(), **env)
    try:
        gateway_a.start()
        gateway_b.start(migrate=False)
        browser = gateway_a.admin_browser("configurer", "a-long-admin-password-9")
        key = gateway_a.create_api_key("settings")
        forwarded = f"10.77.{_octet()}.{_octet()}"  # Redis counts outlive a test: an address of its own

        def models_on_b() -> int:
            with gateway_b.http() as http:
                return http.get("/v1/models", headers={"Authorization": f"Bearer {key}",
                                                       "X-Forwarded-For": forwarded}).status_code

        saved = browser.post("/manage/settings/", data={"action": "save", "OPTIMAGPT_IP_REQUESTS_PER_MINUTE": "3",
                                                        "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        assert saved.status_code == 302
        # B is not behind a trusted proxy here, so it counts the peer's own address: wait for the limit to bite.
        deadline = time.monotonic() + 5
        while models_on_b() != 429:
            assert time.monotonic() < deadline, "gateway B never applied the limit saved on A"
            time.sleep(0.1)

        browser.post("/manage/settings/", data={"action": "reset:OPTIMAGPT_IP_REQUESTS_PER_MINUTE",
                                                "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        browser.post("/manage/settings/", data={"action": "tracing", "tracing": "on",
                                                "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        deadline = time.monotonic() + 5
        while models_on_b() != 200:  # the reset applied on B too
            assert time.monotonic() < deadline, "gateway B kept a limit reset on A"
            time.sleep(0.2)
        time.sleep(1.0)
        with gateway_b.http() as http:
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200

        def traced_by_b() -> list[dict[str, object]]:
            traces = browser.get("/manage/diagnostics/traces/", params={"channel": "API"}).json()["traces"]
            return [t for t in traces if str(t["attributes"]["optimagpt.process"]).endswith(f":{gateway_b.proc.pid}")]

        deadline = time.monotonic() + 5
        while not traced_by_b():
            assert time.monotonic() < deadline, "B's trace never showed in A's viewer"
            time.sleep(0.2)
        lines = browser.get("/manage/diagnostics/logs/").json()["lines"]
        processes = {line["process"].rsplit(":", 1)[1] for line in lines if line["source"] == "gateway"}
        assert str(gateway_b.proc.pid) in processes and str(gateway_a.proc.pid) in processes
    finally:
        gateway_b.stop()
        gateway_a.stop()


def _octet() -> int:
    import random

    return random.randint(1, 254)  # an address for a test, not a secret


def test_readyz_says_503_when_the_database_is_gone_and_healthz_still_answers(
    database_url: str, tmp_path: Path
) -> None:
    import psycopg

    gateway = Gateway(data_dir=tmp_path, port=free_port(), DATABASE_URL=database_url)
    try:
        gateway.start()
        with gateway.http() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
            with psycopg.connect(database_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{database_url.rsplit("/", 1)[1]}" WITH (FORCE)')
            gone = http.get("/readyz", timeout=10)
            assert gone.status_code == 503 and gone.json()["checks"]["database"].startswith("unreachable")
            assert gone.json()["status"] == "unavailable"
            assert http.get("/healthz").json() == {"status": "ok"}
    finally:
        gateway.stop()


def test_a_certificate_applied_on_gateway_a_is_served_by_gateway_b_at_once(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The broadcast, not the periodic check (an hour here), carries a new certificate and its removal to B."""
    import ssl

    def served(port: int) -> str:
        try:
            return ssl.get_server_certificate(("127.0.0.1", port), timeout=2)
        except OSError:
            return ""

    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "OPTIMAGPT_TLS_CHECK_S": "3600"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    port_a, port_b = free_port(), free_port()
    gateway_a = Gateway(data_dir=tmp_path / "a", port=free_port(), OPTIMAGPT_HTTPS_PORT=str(port_a), **env)
    gateway_b = Gateway(data_dir=tmp_path / "b", port=free_port(), OPTIMAGPT_HTTPS_PORT=str(port_b), **env)
    try:
        gateway_a.start()
        gateway_b.start(migrate=False)
        browser = gateway_a.admin_browser("certs-ab", "a-long-admin-password-7")
        for names in ("localhost, gw-one.lan", "localhost, gw-two.lan"):
            made = browser.post("/manage/certificates/", data={"action": "generate", "names": names, "days": "30",
                                                               "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
            assert made.status_code == 302
            stored = browser.get("/manage/certificates/certificate.pem").text
            deadline = time.monotonic() + 5
            while served(port_b).strip() != stored.strip() or served(port_a).strip() != stored.strip():
                assert time.monotonic() < deadline, f"B does not serve the certificate for {names}"
                time.sleep(0.2)
        removed = browser.post("/manage/certificates/", data={"action": "remove",
                                                              "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        assert removed.status_code == 302
        deadline = time.monotonic() + 5
        while served(port_b):
            assert time.monotonic() < deadline, "B still serves HTTPS after the removal"
            time.sleep(0.2)
    finally:
        gateway_a.stop()
        gateway_b.stop()
