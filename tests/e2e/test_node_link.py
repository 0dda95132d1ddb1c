"""The node link between real processes: refusal on a wrong key, reconnection after a gateway restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_ID, NO_END
from tests.processes import Gateway, NodeAgent, free_port, wait_for

pytestmark = pytest.mark.e2e



def test_a_node_with_the_wrong_access_key_is_refused_and_neither_side_crashes(
    gateway: Gateway, node: NodeAgent, models_dir: Path, tmp_path: Path, api_key: str
) -> None:
    intruder = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path, name="intruder",
                         access_key="wrong-key-123")
    intruder.start()
    try:
        wait_for(lambda: "access key mismatch" in gateway.log(), 30, "the gateway to log the refusal")
        wait_for(lambda: "refused" in intruder.log(), 30, "the agent to log the refusal")
        time.sleep(1)
        assert intruder.alive and gateway.alive
        assert "wrong-key-123" not in gateway.log()
        assert "wrong-key-123" not in intruder.log()
        # The refused node is not registered and the real node serves on.
        headers = {"Authorization": f"Bearer {api_key}"}
        assert httpx.get(gateway.url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"] == MODEL_ID
        assert "intruder" not in gateway.nodes_query("list(Node.objects.values_list('name', flat=True))")
    finally:
        assert intruder.stop() == 0


def test_the_node_reconnects_by_itself_after_the_gateway_restarts(models_dir: Path, tmp_path: Path) -> None:
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    (tmp_path / "gw").mkdir()
    gateway.start()
    agent = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / "node")
    (tmp_path / "node").mkdir()
    agent.start()
    try:
        agent.wait_for_model(MODEL_ID)
        assert gateway.stop() == 0, gateway.log()[-3000:]
        wait_for(lambda: "link to" in agent.log() and "lost" in agent.log(), 30, "the agent to notice")
        gateway.start(migrate=False)
        agent.wait_for_model(MODEL_ID, timeout_s=45)
        key = gateway.create_api_key("after-restart")
        reply = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
                                 "max_tokens": 2}, timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
        nodes = gateway.nodes_query("Node.objects.count()")
        assert nodes.strip() == "1", "a reconnecting node must not make a second row"
    finally:
        assert agent.stop() == 0
        gateway.stop()


def test_a_node_lost_mid_stream_ends_the_stream_with_an_error_event_and_no_done(
    models_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "gw").mkdir()
    (tmp_path / "node").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    gateway.start()
    agent = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / "node")
    agent.start()
    try:
        agent.wait_for_model(MODEL_ID)
        key = gateway.create_api_key("mid-stream")
        events = []
        started = time.monotonic()
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": MODEL_ID, "stream": True, "max_tokens": 3000, "logit_bias": NO_END,
                                "messages": [{"role": "user", "content": "Write a very long story."}]},
                          timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 3:
                    agent.kill()  # SIGKILL: no goodbye on the link
        assert time.monotonic() - started < 30, "the stream must end, not hang"
        assert events[-1] != "data: [DONE]"
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "node_disconnected" and error["type"] == "server_error"
        assert gateway.alive
    finally:
        agent.stop()
        gateway.stop()


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, as a gateway with its own CA would have."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "gateway.crt", folder / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_an_https_gateway_is_dialed_over_wss_and_its_certificate_is_checked(models_dir: Path, tmp_path: Path) -> None:
    for folder in ("gw", "node", "stranger"):
        (tmp_path / folder).mkdir()
    cert, key = _self_signed_certificate(tmp_path)
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port(), tls=(cert, key))
    gateway.start()
    # Without the gateway's CA the agent must refuse to link, and keep trying.
    stranger = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / "stranger")
    agent = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / "node",
                      extra_args=("--ca-file", str(cert)))
    stranger.start()
    agent.start()
    try:
        agent.wait_for_model(MODEL_ID)
        assert "wss://localhost" in agent.log()
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in stranger.log(), 30, "the agent to reject the certificate")
        assert stranger.alive
        key_raw = gateway.create_api_key("tls")
        with gateway.http() as client:
            reply = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key_raw}"},
                                json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 2}, timeout=30)
        assert reply.status_code == 200
    finally:
        assert agent.stop() == 0
        assert stranger.stop() == 0
        gateway.stop()
