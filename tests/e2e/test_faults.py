"""Real failures with real processes: every client gets a completion or an error, none hangs, none is lost.

Node agents run SmolLM2 with llama.cpp; clients are the openai SDK and httpx. Each test
starts its own gateway, so that killing things never disturbs the session's stack.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import MODEL_ID, NO_END
from tests.processes import Gateway, NodeAgent, free_port, wait_for

pytestmark = pytest.mark.e2e

LONG = {"max_tokens": 400, "logit_bias": NO_END, "messages": [{"role": "user", "content": "Write a very long story."}]}
# Sampled freely, "Hi" ends before its 8th token about once in 75 replies (4 of 300 seeds): banned here too.
SHORT = {"max_tokens": 8, "logit_bias": NO_END, "messages": [{"role": "user", "content": "Hi"}]}



@dataclass
class Outcome:
    """What one client saw: SSE lines for a stream, the JSON body (or an exception) otherwise."""

    stream: bool
    lines: list[str] = field(default_factory=list)
    status: int | None = None
    body: dict[str, Any] | None = None
    failure: str | None = None
    seconds: float | None = None

    @property
    def tokens_seen(self) -> bool:
        return any('"content":"' in line for line in self.lines)

    @property
    def done(self) -> bool:
        return bool(self.lines) and self.lines[-1] == "data: [DONE]"

    @property
    def error_event(self) -> dict[str, Any] | None:
        if self.lines and not self.done:
            last = json.loads(self.lines[-1].removeprefix("data: "))
            return last.get("error")
        return None

    @property
    def ended(self) -> bool:
        return self.seconds is not None


class Client:
    """Requests in threads, each recording its Outcome."""

    def __init__(self, url: str, key: str, timeout_s: float = 180) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"}
        self.timeout_s = timeout_s
        self.threads: list[threading.Thread] = []
        self.outcomes: list[Outcome] = []

    def send(self, body: dict[str, Any], *, stream: bool) -> Outcome:
        outcome = Outcome(stream=stream)
        self.outcomes.append(outcome)
        thread = threading.Thread(target=self._run, args=(body, outcome), daemon=True)
        thread.start()
        self.threads.append(thread)
        return outcome

    def _run(self, body: dict[str, Any], outcome: Outcome) -> None:
        started = time.monotonic()
        try:
            with httpx.Client(timeout=self.timeout_s) as http:
                if outcome.stream:
                    with http.stream("POST", self.url + "/v1/chat/completions", headers=self.headers,
                                     json={"model": MODEL_ID, "stream": True, **body}) as response:
                        outcome.status = response.status_code
                        for line in response.iter_lines():
                            if line:
                                outcome.lines.append(line)
                else:
                    response = http.post(self.url + "/v1/chat/completions", headers=self.headers,
                                         json={"model": MODEL_ID, **body})
                    outcome.status = response.status_code
                    outcome.body = response.json()
        except Exception as exc:  # noqa: BLE001 - a dropped connection is one of the outcomes under test
            outcome.failure = f"{type(exc).__name__}: {exc}"
        finally:
            outcome.seconds = time.monotonic() - started

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = [o for o in self.outcomes if not o.ended]
        assert not hung, f"{len(hung)} request(s) still running after {timeout_s} s"


def _live_nodes(gateway: Gateway, key: str) -> int:
    response = httpx.get(gateway.url + "/optima/v1/capabilities", headers={"Authorization": f"Bearer {key}"},
                         timeout=5)
    return int(response.json().get("numNodes", 0)) if response.status_code == 200 else 0


def _workers_of(agent: NodeAgent) -> list[psutil.Process]:
    assert agent.proc is not None
    return [p for p in psutil.Process(agent.proc.pid).children(recursive=True)
            if "llama_cpp_worker" in " ".join(p.cmdline())]


@contextmanager
def _stack(tmp_path: Path, models_dir: Path, nodes: int, **env: str) -> Iterator[tuple[Gateway, list[NodeAgent], str]]:
    (tmp_path / "gw").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port(), **env)
    gateway.start()
    agents = []
    # One request decoded at a time per node: so a node holds one generating and one waiting, the two cases
    # these tests tell apart (tests/node_agent/test_batching.py kills a process with eight in one batch).
    for i in range(nodes):
        (tmp_path / f"node{i}").mkdir()
        agents.append(NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / f"node{i}",
                                name=f"node-{i}", extra_args=("--threads", "1", "--parallel", "1")))
    try:
        for agent in agents:
            agent.start()
        key = gateway.create_api_key("faults")
        for agent in agents:
            agent.wait_for_model(MODEL_ID)
        wait_for(lambda: _live_nodes(gateway, key) == nodes, 60, f"{nodes} nodes linked")
        yield gateway, agents, key
    finally:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                with __import__("contextlib").suppress(ProcessLookupError):
                    os.kill(agent.proc.pid, signal.SIGCONT)
            agent.stop()
        gateway.stop()


def _streams_and_queue(client: Client) -> tuple[list[Outcome], list[Outcome]]:
    """Four long streams (two per node: one generating, one waiting on the node), then four short requests
    that wait in the gateway's queue."""
    streams = []
    for _ in range(4):
        streams.append(client.send(LONG, stream=True))
        time.sleep(0.3)  # routed one after the other: the least busy node takes turns
    shorts = [client.send(SHORT, stream=False) for _ in range(4)]
    wait_for(lambda: sum(s.tokens_seen for s in streams) >= 2, 60, "two streams to be generating")
    return streams, shorts


def test_kill_9_of_a_node_with_streams_and_queued_requests_loses_none(models_dir: Path, tmp_path: Path) -> None:
    with _stack(tmp_path, models_dir, nodes=2) as (gateway, agents, key):
        client = Client(gateway.url, key)
        streams, shorts = _streams_and_queue(client)
        victim = agents[0]
        workers = _workers_of(victim)
        assert workers
        victim.kill()  # SIGKILL: no goodbye on the link
        killed_at = time.monotonic()
        client.join(180)

        # The stream that was generating on the dead node ends with an error event and no [DONE] ...
        broken = [s for s in streams if not s.done]
        assert len(broken) == 1, [s.lines[-1:] for s in streams]
        assert broken[0].tokens_seen and broken[0].error_event["code"] == "node_disconnected"
        # ... the one waiting there with nothing sent yet was sent to the other node and completed in full;
        for stream in streams:
            if stream.done:
                usage_free = [json.loads(line.removeprefix("data: ")) for line in stream.lines[:-1]]
                assert usage_free[-1]["choices"][0]["finish_reason"] == "length"
        assert "sending it elsewhere" in gateway.log()
        # ... and every queued request was served.
        assert [s.status for s in shorts] == [200] * 4, [s.body or s.failure for s in shorts]
        assert all(s.body["usage"]["completion_tokens"] == 8 for s in shorts)
        # The dead agent's inference processes did not stay behind, generating for nobody.
        wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), 10,
                  "the dead agent's workers to exit")
        assert time.monotonic() - killed_at < 180


def test_a_stopped_node_is_dropped_within_three_heartbeats_and_its_waiting_request_is_served_elsewhere(
    models_dir: Path, tmp_path: Path
) -> None:
    with _stack(tmp_path, models_dir, nodes=2, OPTIMAGPT_HEARTBEAT_INTERVAL_S="1") as (gateway, agents, key):
        client = Client(gateway.url, key)
        streams, shorts = _streams_and_queue(client)
        victim = agents[0]
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGSTOP)  # the socket stays open; nothing answers on it
        stopped_at = time.monotonic()
        wait_for(lambda: any(s.error_event for s in streams), 10, "the stopped node's stream to end")
        detected_s = time.monotonic() - stopped_at
        assert detected_s <= 3 * 1 + 1.5, f"detected after {detected_s:.1f} s"
        client.join(180)
        broken = [s for s in streams if not s.done]
        assert len(broken) == 1 and broken[0].error_event["code"] == "node_disconnected"
        assert [s.status for s in shorts] == [200] * 4, [s.body or s.failure for s in shorts]
        assert "silent for" in gateway.log()
        # Woken up, the node finds its link gone and links again, with no second row.
        os.kill(victim.proc.pid, signal.SIGCONT)
        wait_for(lambda: _live_nodes(gateway, key) == 2, 60, "the node to link again")
        nodes = gateway.nodes_query("Node.objects.count()")
        assert nodes.strip() == "2"


def test_kill_9_of_an_inference_process_ends_its_stream_and_serves_the_waiting_requests(
    models_dir: Path, tmp_path: Path
) -> None:
    with _stack(tmp_path, models_dir, nodes=1) as (gateway, agents, key):
        client = Client(gateway.url, key)
        stream = client.send(LONG, stream=True)
        wait_for(lambda: stream.tokens_seen, 60, "the stream to be generating")
        shorts = [client.send(SHORT, stream=False) for _ in range(3)]  # one waits on the node, two at the gateway
        time.sleep(0.5)
        (worker,) = _workers_of(agents[0])
        worker.kill()
        client.join(120)
        assert stream.error_event is not None and stream.error_event["code"] == "executor_lost"
        assert [s.status for s in shorts] == [200] * 3, [s.body or s.failure for s in shorts]
        wait_for(lambda: len(_workers_of(agents[0])) == 1, 10, "one worker again")


def test_a_gateway_restart_fails_requests_in_flight_cleanly_and_the_node_returns_without_orphans(
    models_dir: Path, tmp_path: Path
) -> None:
    with _stack(tmp_path, models_dir, nodes=1) as (gateway, agents, key):
        agent = agents[0]
        workers_before = {w.pid for w in _workers_of(agent)}
        client = Client(gateway.url, key)
        stream = client.send(LONG, stream=True)
        wait_for(lambda: stream.tokens_seen, 60, "the stream to be generating")
        waiting = [client.send(LONG, stream=False) for _ in range(3)]  # one on the node, two in the queue
        time.sleep(0.5)
        stopped_at = time.monotonic()
        assert gateway.stop() == 0, gateway.log()[-3000:]
        client.join(30)
        assert time.monotonic() - stopped_at < 30
        # Every client learnt it failed: a cut stream or connection, never a hang or a false success.
        assert not stream.done
        for outcome in waiting:
            assert outcome.failure is not None or (outcome.status is not None and outcome.status >= 500), outcome
        gateway.start(migrate=False)
        wait_for(lambda: _live_nodes(gateway, key) == 1, 60, "the node to link again")
        # The node dropped the replies nobody would read: cancelled by the stopping gateway (its requests are
        # cancelled as it stops, each sending its node a cancel), or by the node itself as the link closed.
        log = agent.log()
        assert "cancelling them" in log or '"type":"cancel"' in log, "the node dropped the replies nobody would read"
        assert {w.pid for w in _workers_of(agent)} == workers_before, "the same inference process, no other"
        nodes = gateway.nodes_query("Node.objects.count()")
        assert nodes.strip() == "1", "no duplicate node row"
        # The process is free at once: nothing is still generating the old 400-token replies.
        started = time.monotonic()
        reply = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": MODEL_ID, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]},
                           timeout=30)
        assert reply.status_code == 200
        assert time.monotonic() - started < 4, "the old replies were still being generated"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, Any, Any]]:
    """A redis-server of this test's own, which the test may stop and start (the machine's Redis stays up)."""
    import shutil

    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed, and CI must run this test")
        pytest.skip("redis-server is not installed")
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        processes.append(subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no", "--dir", str(tmp_path)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import redis

        wait_for(lambda: _pings(redis, port), 10, "redis-server to answer")

    def stop() -> None:
        processes[-1].kill()
        processes[-1].wait()
        import redis
        assert not _pings(redis, port), "redis-server still answers after being killed"

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", start, stop
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _pings(redis: Any, port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_redis_stopping_and_starting_under_load_ends_every_request_and_service_resumes(
    models_dir: Path, tmp_path: Path, private_redis: tuple[str, Any, Any]
) -> None:
    url, start_redis, stop_redis = private_redis
    env = {"REDIS_URL": url, "OPTIMAGPT_REQUEST_DEADLINE_S": "20", "OPTIMAGPT_FIRST_EVENT_TIMEOUT_S": "5"}
    with _stack(tmp_path, models_dir, nodes=1, **env) as (gateway, agents, key):
        results: list[tuple[float, float, int | str]] = []  # (started, seconds, status or failure)
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        response = http.post(gateway.url + "/v1/chat/completions",
                                             headers={"Authorization": f"Bearer {key}"},
                                             json={"model": MODEL_ID, **SHORT, "max_tokens": 2})
                        outcome: int | str = response.status_code
                        if response.status_code != 200:
                            assert "error" in response.json(), response.text
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    results.append((started, time.monotonic() - started, outcome))
                    time.sleep(0.05)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        down_at = time.monotonic()
        stop_redis()
        time.sleep(10)
        restart_at = time.monotonic()  # Redis may answer before start_redis() has seen it answer
        start_redis()
        up_at = time.monotonic()
        time.sleep(20)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert max(seconds for _, seconds, _ in results) < 20 + 5, "a request ran past its deadline"
        # While Redis is away, no request is left waiting: the node's link is held by this very gateway process,
        # so its requests do not cross Redis and are still served (a request for a link another process holds
        # is refused at once in OpenAI's form, 503: tests/gateway/test_queue.py and the dispatch's own checks).
        during = [(d, o) for s, d, o in results if down_at + 1 < s < restart_at - 2]
        assert during, "no request was sent while Redis was away"
        wrong = [(round(s - down_at, 2), round(d, 2), o) for s, d, o in results
                 if down_at + 1 < s < restart_at - 2 and (o != 200 or d >= 2)]
        assert not wrong, f"(started after the kill, seconds, outcome): {wrong}"
        before = [o for s, d, o in results if s + d < down_at]
        assert before and all(o == 200 for o in before)
        # Service resumes after Redis is back: the last requests are all answered.
        late = [o for s, _, o in results if s > up_at + 10]
        assert late and all(o == 200 for o in late), late
        assert gateway.alive and agents[0].alive


def test_while_redis_is_away_a_request_for_another_processs_link_is_refused_at_once(
        tmp_path: Path, private_redis: tuple[str, Any, Any], database_url: str) -> None:
    """Gateway A routes to a node linked to gateway B: that crosses Redis, so without it A says 503 at once."""
    from tests.processes import SimulatedNodes

    url, start_redis, stop_redis = private_redis
    env = {"REDIS_URL": url, "DATABASE_URL": database_url, "OPTIMAGPT_FIRST_EVENT_TIMEOUT_S": "5"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    gateway_a = Gateway(data_dir=tmp_path / "a", port=free_port(), **env)
    gateway_b = Gateway(data_dir=tmp_path / "b", port=free_port(), **env)
    gateway_a.start()
    gateway_b.start(migrate=False)
    node = SimulatedNodes(gateway=gateway_b, log_dir=tmp_path, model="elsewhere")
    try:
        node.start()
        key = gateway_a.create_api_key("across")

        def ask() -> tuple[int, float]:
            started = time.monotonic()
            response = httpx.post(gateway_a.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "elsewhere", **SHORT}, timeout=30)
            return response.status_code, time.monotonic() - started

        wait_for(lambda: ask()[0] == 200, 30, "gateway A to reach B's node over Redis")
        stop_redis()
        status, seconds = ask()
        assert status == 503 and seconds < 2, (status, seconds)
        start_redis()
        wait_for(lambda: ask()[0] == 200, 30, "service to resume once Redis is back")
    finally:
        node.stop()
        gateway_a.stop()
        gateway_b.stop()


def test_two_hundred_simulated_nodes_share_four_hundred_requests_at_once(tmp_path: Path) -> None:
    """Routing at scale, with protocol-level nodes (node_agent.simulator) in one process: each node has one
    slot of two requests; 400 requests at once fill every slot, none waits or fails, and every node works."""
    import asyncio

    from tests.processes import SimulatedNodes

    (tmp_path / "gw").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    gateway.start()
    nodes = SimulatedNodes(gateway=gateway, log_dir=tmp_path, count=200, delay_s=1.0, metrics_interval_s=3600)
    try:
        nodes.start(timeout_s=120)
        key = gateway.create_api_key("scale")
        wait_for(lambda: _live_nodes(gateway, key) == 200, 60, "200 nodes registered")

        async def burst() -> list[int]:
            limits = httpx.Limits(max_connections=400)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as http:
                async def one() -> int:
                    response = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                               json={"model": "sim", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "hi"}]})
                    return response.status_code
                return await asyncio.gather(*(one() for _ in range(400)))

        statuses = asyncio.run(burst())
        assert statuses == [200] * 400
    finally:
        nodes.stop()
        gateway.stop()
    served = nodes.log().rsplit("served", 1)[1]
    assert served.startswith(" 400 requests"), served
    assert "min 0" not in served, f"a node got no request: {served}"


def test_a_node_lost_mid_reply_in_a_conversation_shows_the_error_and_keeps_the_partial_reply(
    models_dir: Path, tmp_path: Path
) -> None:
    with _stack(tmp_path, models_dir, nodes=1) as (gateway, agents, key):
        headers = gateway.chat_user("frank", "a-conversation-password-1")
        base = gateway.url + "/optima/v1/conversations"
        conversation = httpx.post(base, headers=headers, json={"modelId": MODEL_ID, "temperature": 0.0}).json()
        events: list[dict[str, Any]] = []
        with httpx.stream("POST", f"{base}/{conversation['id']}/messages", headers=headers, timeout=60,
                          json={"content": "Write a very long story about a lighthouse keeper."}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if len(events) == 2:
                        agents[0].kill()  # SIGKILL mid-reply: the link drops without a word
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "error" and set(kinds[:-1]) == {"delta"}, kinds
        assert events[-1]["error"]["code"] == "node_disconnected"
        partial = "".join(e["content"] for e in events if e["type"] == "delta")
        saved = events[-1]["message"]
        assert saved["status"] == "error" and saved["content"] == partial and saved["error"]

        got = httpx.get(f"{base}/{conversation['id']}", headers=headers).json()
        assert got["status"] == "Error"
        assert [(m["role"], m["status"], m["content"]) for m in got["messages"]][-1] == ("assistant", "error", partial)
