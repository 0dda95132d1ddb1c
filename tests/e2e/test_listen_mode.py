"""Gateway-initiated links with real processes: a node in listen mode (wss, its own certificate), verified and
pinned, dialed by the gateway, re-dialed after either side restarts, exactly one link across two gateways,
first-time auto-connect, and verification failures that name their cause."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from node_agent.tls import fingerprint_of_file
from tests.conftest import MODEL_ID
from tests.processes import REPO, Gateway, NodeAgent, free_port, wait_for

pytestmark = pytest.mark.e2e



def listening(gateway: Gateway, models_dir: Path, state_dir: Path, port: int, **kwargs) -> NodeAgent:
    state_dir.mkdir(exist_ok=True)
    agent = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=state_dir,
                      extra_args=("--listen", f"127.0.0.1:{port}"), **kwargs)
    agent.start()
    wait_for(lambda: "listening on wss://" in agent.log(), 30, "the agent to listen")
    return agent


def add_node(gateway: Gateway, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", "add_node", "127.0.0.1", "--port", str(port)], cwd=REPO,
                          env=gateway.env, capture_output=True, text=True, timeout=60)


def chat(gateway: Gateway, key: str) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


def test_a_verified_listening_node_is_dialed_pinned_and_dialed_again_after_restarts(
        models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "gw").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    gateway.start()
    port = free_port()
    agent = listening(gateway, models_dir, tmp_path / "node", port)
    try:
        added = add_node(gateway, port)
        assert added.returncode == 0, added.stderr
        fingerprint = fingerprint_of_file(tmp_path / "node" / "node-cert.pem")
        assert fingerprint in added.stdout, "the pinned certificate is the node's own"
        agent.wait_for_model(MODEL_ID)
        key = gateway.create_api_key("listen")
        assert chat(gateway, key).status_code == 200

        # The node restarts: same certificate, the gateway dials again by itself.
        assert agent.stop() == 0
        agent.start()
        agent.wait_for_model(MODEL_ID, timeout_s=60)
        assert fingerprint_of_file(tmp_path / "node" / "node-cert.pem") == fingerprint
        # The gateway restarts: its dialer comes back and links again; still one node row.
        assert gateway.stop() == 0
        gateway.start(migrate=False)
        agent.wait_for_model(MODEL_ID, timeout_s=60)
        assert chat(gateway, key).status_code == 200
        count = gateway.nodes_query("Node.objects.count()")
        assert count.strip() == "1"
        again = add_node(gateway, port)
        assert again.returncode != 0 and "registered already" in again.stderr
    finally:
        agent.stop()
        gateway.stop()


def test_verification_names_the_cause_of_a_failure(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "gw").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    gateway.start()
    try:
        nothing = add_node(gateway, free_port())
        assert "nothing is listening" in nothing.stderr
        plain_http = add_node(gateway, gateway.port)  # a web server, not a wss node
        assert "TLS failed" in plain_http.stderr, plain_http.stderr
        port = free_port()
        wrong = listening(gateway, models_dir, tmp_path / "wrong", port, access_key="another-key-entirely")
        try:
            mismatch = add_node(gateway, port)
            assert "access key mismatch" in mismatch.stderr, mismatch.stderr
            assert "another-key-entirely" not in wrong.log() + gateway.log() + mismatch.stderr
        finally:
            wrong.stop()
        count = gateway.nodes_query("Node.objects.count()")
        assert count.strip() == "0", "nothing is registered by a failed verification"
    finally:
        gateway.stop()


def test_with_no_node_registered_the_gateway_adopts_the_local_listening_node(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "gw").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port(), OPTIMAGPT_AUTO_CONNECT_ADDRESS=f"127.0.0.1:{port}")
    agent = listening(gateway, models_dir, tmp_path / "node", port)
    gateway.start()
    try:
        agent.wait_for_model(MODEL_ID, timeout_s=60)
        name = gateway.nodes_query("Node.objects.get().name")
        assert name.strip() == "Local Node"
    finally:
        agent.stop()
        gateway.stop()


def test_two_gateways_keep_exactly_one_link_to_a_listening_node(
        database_url: str, redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Gateway(data_dir=tmp_path / "a", port=free_port(), **env)
    b = Gateway(data_dir=tmp_path / "b", port=free_port(), **env)
    a.start()
    b.start(migrate=False)
    port = free_port()
    agent = listening(a, models_dir, tmp_path / "node", port)
    try:
        assert add_node(a, port).returncode == 0
        agent.wait_for_model(MODEL_ID)
        time.sleep(8)  # several dialer ticks of both gateways
        # add_node's verification was one short link; since then, exactly one gateway process holds one.
        assert agent.log().count("linked to") == 2, "exactly one gateway process dials the node"
        key = a.create_api_key("both")
        assert chat(a, key).status_code == 200 and chat(b, key).status_code == 200
        # The gateway holding the link stops: it gives its lease back and the other one dials.
        owner = a.nodes_query("Node.objects.get().dial_owner")
        holder_pid = int(owner.strip().split(":")[1])
        holder, other = (a, b) if a.proc is not None and a.proc.pid == holder_pid else (b, a)
        assert holder.proc is not None and holder.proc.pid == holder_pid
        assert holder.stop() == 0
        wait_for(lambda: agent.log().count("linked to") == 3, 30, "the other gateway to dial")
        assert chat(other, key).status_code == 200
    finally:
        agent.stop()
        a.stop()
        b.stop()


def test_the_new_node_wizard_verifies_then_finishes_and_deactivation_closes_the_link(
        models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "gw").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    gateway.start()
    port = free_port()
    agent = listening(gateway, models_dir, tmp_path / "node", port)
    browser = gateway.admin_browser("wizard-admin", "a-long-wizard-password")
    try:
        form = {"name": "gpu-box", "host": "127.0.0.1", "port": str(port),
                "csrfmiddlewaretoken": browser.cookies["csrftoken"]}
        verified = browser.post("/manage/nodes/new/", data={**form, "step": "verify"})
        fingerprint = fingerprint_of_file(tmp_path / "node" / "node-cert.pem")
        assert verified.status_code == 200 and fingerprint in verified.text and "Finish" in verified.text
        assert "gpu-box" not in browser.get("/manage/nodes/").text, "Next saves nothing"
        finished = browser.post("/manage/nodes/new/", data={**form, "step": "finish", "fingerprint": fingerprint})
        assert finished.status_code == 302, finished.text
        agent.wait_for_model(MODEL_ID)
        nodes_page = browser.get("/manage/nodes/").text
        assert "gpu-box" in nodes_page and "dot-green" in nodes_page

        pk = gateway.nodes_query("Node.objects.get().pk")
        browser.post(f"/manage/nodes/{pk.strip()}/activation/",
                     data={"activated": "false", "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        wait_for(lambda: "dot-grey" in browser.get("/manage/nodes/").text, 10, "grey")
        key = gateway.create_api_key("deactivated")
        wait_for(lambda: chat(gateway, key).status_code == 503, 15, "the deactivated node to stop serving")
        browser.post(f"/manage/nodes/{pk.strip()}/activation/",
                     data={"activated": "true", "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        agent.wait_for_model(MODEL_ID, timeout_s=30)
        assert chat(gateway, key).status_code == 200
    finally:
        browser.close()
        agent.stop()
        gateway.stop()
