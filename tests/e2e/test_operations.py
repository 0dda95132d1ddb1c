"""Operating the gateway, end to end on real daphne, node agents and llama.cpp: /metrics moving with real
requests, the request log and its page and API, provenance headers, per-address limits on real HTTP, a
rotated node access key with its grace period, and System Tracing in real headless Chromium (with MCP tool
calls, and off again after a restart). No key, password or node key shows in any page, log, metric or trace.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ARTIFACTS, MODEL_ID
from tests.e2e.test_chat_browser import PASSWORD, _signed_in
from tests.processes import (
    METRICS_TOKEN,
    NODE_ACCESS_KEY,
    REPO,
    Gateway,
    McpTestServer,
    NodeAgent,
    SimulatedNodes,
    free_port,
    mcp_server_add,
    wait_for,
)

pytestmark = pytest.mark.e2e

CANARY = "zebra-canary-7c1f3e-in-a-prompt"


def _scrape(gateway: Gateway) -> dict[str, Any]:
    with gateway.http() as http:
        response = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200, response.text
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def _value(families: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    family = families.get(name)
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples if (sample is None or s.name == sample)
               and all(s.labels.get(k) == v for k, v in labels.items()))


def _user(gateway: Gateway, username: str, kind: str, *key_scopes: str) -> str:
    """A person (Admin: every permission; User: Chat only) and an API key of theirs with `key_scopes`."""
    subprocess.run([sys.executable, "manage.py", "create_user", username, "--type", kind], cwd=REPO,
                   env=gateway.env, input=PASSWORD + "\n", text=True, check=True, capture_output=True)
    return gateway.manage("create_api_key", "--name", f"{username}-key", "--user", username,
                          "--scopes", *key_scopes).strip()


def _recent(gateway: Gateway, key: str, **params: Any) -> httpx.Response:
    with gateway.http() as http:
        return http.get("/optima/v1/requests", params=params,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


# -- on the session's gateway and node ---------------------------------------------------------------
def test_metrics_move_with_real_requests(gateway: Gateway, client: openai.OpenAI) -> None:
    before = _scrape(gateway)
    for stream in (False, True):
        reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=5, stream=stream,
                                               **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            list(reply)
    client.embeddings.create(model=MODEL_ID, input="one")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model-anywhere", messages=[{"role": "user", "content": "x"}])
    wait_for(lambda: _value(_scrape(gateway), "optimagpt_requests", model=MODEL_ID, operation="embeddings") >
             _value(before, "optimagpt_requests", model=MODEL_ID, operation="embeddings"), 10, "metrics")
    after = _scrape(gateway)

    def moved(name: str, sample: str | None = None, **labels: str) -> float:
        return _value(after, name, sample, **labels) - _value(before, name, sample, **labels)

    assert moved("optimagpt_requests", model=MODEL_ID, operation="chat.completions", status="200") == 2
    assert moved("optimagpt_requests", model=MODEL_ID, operation="embeddings", status="200") == 1
    # A model nobody serves is counted without its name: a label is never what any caller typed.
    assert moved("optimagpt_requests", model="", operation="chat.completions", status="404") == 1
    assert not [s for f in after.values() for s in f.samples if s.labels.get("model") == "no-such-model-anywhere"]
    assert moved("optimagpt_generation_tokens", model=MODEL_ID) >= 10
    assert moved("optimagpt_prompt_tokens", model=MODEL_ID) > 0
    assert moved("optimagpt_time_to_first_token_seconds", "optimagpt_time_to_first_token_seconds_count",
                 model=MODEL_ID) == 1  # the streamed one
    assert moved("optimagpt_inter_token_latency_seconds", "optimagpt_inter_token_latency_seconds_count",
                 model=MODEL_ID) >= 1
    assert moved("optimagpt_request_duration_seconds", "optimagpt_request_duration_seconds_count",
                 model=MODEL_ID, operation="chat.completions") == 2
    assert moved("optimagpt_queue_wait_seconds", "optimagpt_queue_wait_seconds_count", model=MODEL_ID) == 3
    assert _value(after, "optimagpt_nodes_linked") >= 1
    assert _value(after, "optimagpt_executors", state="online") >= 1
    assert _value(after, "optimagpt_node_ram_total_bytes", node="e2e-node") > 0
    processes = {s.labels["process"] for s in after["optimagpt_requests"].samples}
    assert len(processes) == 1 and processes.pop().endswith(f":{gateway.proc.pid}")
    # The Grafana dashboard in docs/ asks only for series this gateway serves.
    dashboard = (REPO / "docs/grafana-dashboard.json").read_text()
    asked = {re.sub(r"_(total|bucket|count|sum)$", "", name)
             for name in re.findall(r"\b(optimagpt_[a-z_]+|process_[a-z_]+)", dashboard)}
    assert asked and not asked - set(after), asked - set(after)  # (counters show before their first count)


def test_an_answer_names_its_node_and_the_weights_that_made_it(gateway: Gateway, client: openai.OpenAI,
                                                              model_path: Path) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert raw.headers["x-optimagpt-node"] == "e2e-node"
    assert raw.headers["x-optimagpt-model-sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    with client.chat.completions.with_streaming_response.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True) as streamed:
        assert streamed.headers["x-optimagpt-node"] == "e2e-node"
    models = client.models.with_raw_response.list()
    assert "x-optimagpt-node" not in models.headers  # only answers a node made


def test_the_request_log_keeps_a_real_requests_figures_and_never_its_prompt(gateway: Gateway,
                                                                           client: openai.OpenAI) -> None:
    admin_key = _user(gateway, "logreader", "admin", "management")
    chat_user_key = _user(gateway, "nosettings", "user", "management")
    stream = client.chat.completions.create(model=MODEL_ID, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": f"Repeat: {CANARY}"}])
    usage = [c.usage for c in stream if c.usage][0]

    def logged() -> dict[str, Any] | None:
        found = [e for e in _recent(gateway, admin_key, limit=50, operation="chat.completions").json()["data"]
                 if e["stream"] and e["completion_tokens"] == usage.completion_tokens
                 and e["prompt_tokens"] == usage.prompt_tokens]
        return found[0] if found else None

    entry = wait_for(logged, 10, "the request in the request log")
    assert entry["status"] == 200 and entry["error_code"] is None and entry["model"] == MODEL_ID
    assert entry["node"] == "e2e-node" and entry["client"] == "127.0.0.1" and entry["method"] == "POST"
    assert entry["key_prefix"] and client.api_key.startswith(entry["key_prefix"])
    assert 0 < entry["ttft_ms"] <= entry["latency_ms"]
    # Filters, and the permission: Settings Access, with a management key or a JWT.
    assert all(e["status"] >= 400 for e in _recent(gateway, admin_key, status="4xx").json()["data"])
    assert len(_recent(gateway, admin_key, limit=1).json()["data"]) == 1
    assert _recent(gateway, admin_key, limit=0).status_code == 400
    assert _recent(gateway, client.api_key).json()["error"]["code"] == "missing_scope"
    refused = _recent(gateway, chat_user_key)  # a User: no Access Gateway, no Settings Access
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert _recent(gateway, "").status_code == 401
    # The page shows it too, with filters and paging.
    browser = gateway.admin_browser("logpage", PASSWORD)
    page = browser.get("/manage/requests/", params={"model": MODEL_ID, "operation": "chat.completions"})
    assert page.status_code == 200 and "e2e-node" in page.text and MODEL_ID in page.text
    assert "Page 1 of" in page.text
    # Prompts and replies are never kept: the canary is in no table of the gateway's database.
    database = gateway.data_dir / "optimagpt.sqlite3"
    contents = b"".join(p.read_bytes() for p in database.parent.glob("optimagpt.sqlite3*"))
    assert CANARY.encode() not in contents


# -- a gateway of this module: per-address limits, tracing, provenance off ---------------------------------
@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("operations")
    gateway = Gateway(data_dir=base, port=free_port(), OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE="3",
                      OPTIMAGPT_TRUSTED_PROXIES="127.0.0.1", OPTIMAGPT_PROVENANCE_HEADERS="false")
    node = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=base / "node", name="ops-node")
    (base / "node").mkdir()
    tools = SimulatedNodes(gateway=gateway, log_dir=base, model="toolsmith", prefix="toolsmith", tool_call="add",
                           tool_args='{"a": 19, "b": 23}')
    server = McpTestServer(log_dir=base)
    try:
        gateway.start()
        node.start()
        tools.start()
        server.start()
        node.wait_for_model(MODEL_ID)
        key = gateway.create_api_key("ops")
        subprocess.run([sys.executable, "manage.py", "create_user", "operator", "--type", "admin"], cwd=REPO,
                       env=gateway.env, input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        browser = gateway.http()
        browser.get("/login/")
        assert browser.post("/login/", data={"username": "operator", "password": PASSWORD,
                                             "csrfmiddlewaretoken": browser.cookies["csrftoken"]}).status_code == 302
        mcp_server_add(browser, "calc", url=server.url)
        yield {"gateway": gateway, "key": key, "browser": browser, "node": node}
    finally:
        server.stop()
        tools.stop()
        node.stop()
        gateway.stop()


def _post_settings(browser: httpx.Client, **fields: str) -> httpx.Response:
    return browser.post("/manage/settings/", data={**fields, "csrfmiddlewaretoken": browser.cookies["csrftoken"]})


def test_failed_authentications_from_one_address_are_throttled_and_its_valid_keys_still_pass(ops) -> None:
    gateway, key = ops["gateway"], ops["key"]

    def models(address: str, credential: str) -> httpx.Response:
        with gateway.http() as http:
            return http.get("/v1/models", headers={"Authorization": f"Bearer {credential}",
                                                   "X-Forwarded-For": address})

    assert [models("10.9.0.1", "sk-optima-guess").status_code for _ in range(3)] == [401, 401, 401]
    throttled = models("10.9.0.1", "sk-optima-guess")
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) > 0
    assert throttled.json()["error"]["code"] == "too_many_authentication_failures"
    assert models("10.9.0.1", key).status_code == 200  # the same office address, with a valid key
    assert models("10.9.0.2", "sk-optima-guess").status_code == 401  # another address: its own count
    with gateway.http() as http:  # without the header: the proxy's own address, counted apart
        assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_requests_per_address_limit_set_on_the_page_applies_at_once(ops) -> None:
    gateway, key, browser = ops["gateway"], ops["key"], ops["browser"]
    assert _post_settings(browser, action="save", OPTIMAGPT_IP_REQUESTS_PER_MINUTE="4").status_code == 302
    try:
        with gateway.http() as http:
            statuses = [http.get("/v1/models", headers={"Authorization": f"Bearer {key}",
                                                        "X-Forwarded-For": "10.9.1.1"}) for _ in range(5)]
        assert [r.status_code for r in statuses] == [200, 200, 200, 200, 429]
        assert statuses[-1].json()["error"]["code"] == "address_rate_limit_exceeded"
        assert int(statuses[-1].headers["Retry-After"]) > 0
    finally:
        _post_settings(browser, action="reset:OPTIMAGPT_IP_REQUESTS_PER_MINUTE")
    with gateway.http() as http:
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}",
                                               "X-Forwarded-For": "10.9.1.1"}).status_code == 200


def test_provenance_headers_can_be_switched_off(ops) -> None:
    client = openai.OpenAI(base_url=ops["gateway"].url + "/v1", api_key=ops["key"], max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert "x-optimagpt-node" not in raw.headers and "x-optimagpt-model-sha256" not in raw.headers


def _traces(browser: httpx.Client, channel: str) -> list[dict[str, Any]]:
    response = browser.get("/manage/diagnostics/traces/", params={"channel": channel})
    assert response.status_code == 200
    return response.json()["traces"]


def test_tracing_shows_a_real_requests_spans_in_the_viewer_and_a_restart_switches_it_off(browser, ops) -> None:
    gateway, key, session = ops["gateway"], ops["key"], ops["browser"]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)
    client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert _traces(session, "LLM Inference") == []  # off: nothing is traced

    problems: list[str] = []
    context, page = _signed_in(browser, gateway, "operator", problems, width=1400)
    try:
        page.goto(gateway.url + "/manage/settings/")
        page.click("#tracing-form button[type=submit]")
        page.locator("#tracing-form button", has_text="Switch off").wait_for()
        page.screenshot(path=str(ARTIFACTS / "configuration.png"), full_page=True)
        stream = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        client.embeddings.create(model=MODEL_ID, input="one")
        tooled = client.chat.completions.create(model="toolsmith", messages=[{"role": "user", "content": "19+23"}],
                                                tools=[{"type": "mcp", "server_label": "calc"}])
        assert tooled.choices[0].message.content == "Tool result: 42"
        wait_for(lambda: len(_traces(session, "LLM Inference")) >= 2, 10, "the traces")

        page.goto(gateway.url + "/manage/diagnostics/")
        page.wait_for_selector("#traces[data-loaded=true]")
        rows = page.locator("#trace-list tbody tr", has_text="POST /v1/chat/completions")
        assert rows.count() == 2
        rows.last.click()  # newest first: the last is the streamed one
        spans = page.locator("#trace-view .span-row")
        spans.first.wait_for()
        names = [s.get_attribute("data-span") for s in spans.all()]
        assert names[0] == "POST /v1/chat/completions"
        for name in ("authentication", "route choice", "node", "first token", "generation", "finish"):
            assert name in names, names
        bar = page.locator("#trace-view .span-row[data-span=generation] .span-bar")
        assert float(bar.evaluate("b => parseFloat(b.style.width)")) > 0
        rows.first.click()  # the tool-using one
        page.locator("#trace-view .span-row[data-span='mcp tool call']").wait_for()
        assert "mcp.tool=add" in page.inner_text("#trace-view")
        page.screenshot(path=str(ARTIFACTS / "diagnostics-trace.png"), full_page=True)
        page.click("#trace-channels [data-channel='Embedding Inference']")
        page.locator("#trace-list tbody tr", has_text="POST /v1/embeddings").wait_for()
        page.click("#trace-channels [data-channel='Tool Calls']")
        page.locator("#trace-list tbody tr", has_text="calc add").wait_for()
        # The live log: the gateway's lines and the node's, levels coloured.
        page.wait_for_selector("#diagnostics-log[data-loaded=true]")
        page.locator("#diagnostics-log .l-GATEWAY").first.wait_for()
        page.locator("#diagnostics-log div:not(.l-GATEWAY) .src", has_text="[ops-node]").first.wait_for()
        page.select_option("#log-node", "gateway")
        page.wait_for_function("() => document.querySelectorAll('#diagnostics-log > div').length > 0 && "
                               "[...document.querySelectorAll('#diagnostics-log > div')].every("
                               "d => d.classList.contains('l-GATEWAY'))")
        assert not problems, problems
        texts = [page.content()]
        page.goto(gateway.url + "/manage/settings/")
        texts.append(page.content())
    finally:
        context.close()
    trace = _traces(session, "LLM Inference")[-1]
    spans = {s["name"]: s for s in trace["spans"]}
    assert spans["first token"]["offset_ms"] <= spans["generation"]["offset_ms"]
    assert trace["attributes"]["gen_ai.usage.output_tokens"] == 8
    texts += [json.dumps(_traces(session, c)) for c in ("LLM Inference", "Embedding Inference", "Tool Calls")]
    texts += [session.get("/manage/diagnostics/logs/").text, session.get("/manage/requests/").text,
              json.dumps(_scrape(gateway), default=str), gateway.log()]
    _no_secret_in(texts, key, PASSWORD, NODE_ACCESS_KEY)

    gateway.stop()
    gateway.start(migrate=False)
    ops["node"].wait_for_model(MODEL_ID)
    page = session.get("/manage/settings/").text
    assert "Switch on" in page and "Switch off" not in page
    client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    time.sleep(1.0)
    assert _traces(session, "LLM Inference") == []


def _no_secret_in(texts: list[str], *secrets: str) -> None:
    for secret in secrets:
        leaks = [t[max(0, t.find(secret) - 80):t.find(secret) + 80] for t in texts if secret in t]
        assert not leaks, f"a secret shows: {leaks}"


# -- a gateway of its own: the node access key rotated ------------------------------------------------

def test_a_rotated_node_key_keeps_old_nodes_for_the_grace_period_then_refuses_them(tmp_path: Path) -> None:
    key_file = tmp_path / "node_access_key"
    key_file.write_text(NODE_ACCESS_KEY + "\n")
    gateway = Gateway(data_dir=tmp_path, port=free_port(), OPTIMAGPT_NODE_ACCESS_KEY_FILE=str(key_file))
    empty = tmp_path / "models"
    empty.mkdir()

    def agent(name: str, **env: str) -> NodeAgent:
        (tmp_path / name).mkdir()
        node = NodeAgent(gateway=gateway, models_dir=empty, state_dir=tmp_path / name, name=name)
        node.env.update(env)
        if "OPTIMAGPT_NODE_ACCESS_KEY_FILE" in env:
            node.env.pop("OPTIMAGPT_NODE_ACCESS_KEY")
        return node

    local = agent("local", OPTIMAGPT_NODE_ACCESS_KEY_FILE=str(key_file))  # as the run command's local node
    remote = agent("remote")  # its key in its environment: only an admin can give it the new one
    nodes = [local, remote]
    try:
        gateway.start()
        local.start()
        remote.start()
        wait_for(lambda: gateway.node_linked("local") and gateway.node_linked("remote"), 30, "both nodes linked")
        browser = gateway.admin_browser("keeper", PASSWORD)
        grace_s = 8.0
        rotated_at = time.time()
        page = _post_settings(browser, action="rotate", grace_hours=str(grace_s / 3600))
        new_key = re.search(r'data-field="new-key">([^<]+)<', page.text).group(1)
        assert new_key != NODE_ACCESS_KEY and key_file.read_text().strip() == new_key
        assert new_key not in browser.get("/manage/settings/").text and "still accepted until" in page.text

        late = agent("late")  # joins during the grace period with the old key: still let in
        nodes.append(late)
        late.start()
        wait_for(lambda: gateway.node_linked("late"), 30, "an old-key node linked during the grace period")
        assert time.time() - rotated_at < grace_s, "the grace period ended before the check"

        # After it: old-key links are closed and their handshakes refused; the local node took the new key.
        wait_for(lambda: not gateway.node_linked("remote") and not gateway.node_linked("late"), 30,
                 "old-key links closed")
        wait_for(lambda: "gateway refused the link: access key mismatch" in remote.log(), 30, "a refused handshake")
        wait_for(lambda: gateway.node_linked("local"), 30, "the local node linked again with the new key")
        assert not gateway.node_linked("remote")
        fresh = agent("fresh", OPTIMAGPT_NODE_ACCESS_KEY=new_key)
        nodes.append(fresh)
        fresh.start()
        wait_for(lambda: gateway.node_linked("fresh"), 30, "a node with the new key linked")
        for node in nodes:
            assert new_key not in node.log()
        assert new_key not in gateway.log() and NODE_ACCESS_KEY not in gateway.log()
    finally:
        for node in nodes:
            node.stop()
        gateway.stop()


def test_traces_also_go_to_an_opentelemetry_collector_when_one_is_set(tmp_path: Path) -> None:
    """A real OTLP/HTTP receiver in this test (the protobuf ExportTraceServiceRequest, decoded with the
    OpenTelemetry proto package) gets the spans of a traced request."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the http.server API names it so
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                received.append(message)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gateway = Gateway(data_dir=tmp_path, port=free_port(),
                      OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}",
                      OTEL_BSP_SCHEDULE_DELAY="200")
    try:
        gateway.start()
        browser = gateway.admin_browser("collector", PASSWORD)
        assert _post_settings(browser, action="tracing", tracing="on").status_code == 302
        key = gateway.create_api_key("otlp")
        with gateway.http() as http:
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200

        def spans() -> list[Any]:
            return [span for message in received for resource in message.resource_spans
                    for scope in resource.scope_spans for span in scope.spans]

        wait_for(lambda: any(s.name == "GET /v1/models" for s in spans()), 15, "the spans at the collector")
        names = {s.name for s in spans()}
        assert {"GET /v1/models", "authentication", "finish"} <= names
        root = next(s for s in spans() if s.name == "GET /v1/models")
        attributes = {a.key: a.value for a in root.attributes}
        assert attributes["http.response.status_code"].int_value == 200
        assert attributes["optimagpt.channel"].string_value == "API"
        assert key not in str(received)
        service = {a.key: a.value.string_value for a in received[0].resource_spans[0].resource.attributes}
        assert service["service.name"] == "optimagpt-gateway"
    finally:
        gateway.stop()
        server.shutdown()
