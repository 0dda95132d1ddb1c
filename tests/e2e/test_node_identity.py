"""Node identity between real processes: a new node waits for approval; an impostor with the shared key and
another node's id is refused while the real node serves on."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_ID
from tests.processes import Gateway, NodeAgent, free_port, wait_for

pytestmark = pytest.mark.e2e


def _node_field(gateway: Gateway, node_id: str, field: str) -> str:
    return gateway.nodes_query(f"Node.objects.get(node_id={node_id!r}).{field}")


def test_a_new_node_waits_for_approval_and_an_impostor_cannot_take_its_link(models_dir: Path, tmp_path: Path) -> None:
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port(), OPTIMAGPT_NODE_AUTO_APPROVE="false")
    (tmp_path / "gw").mkdir()
    gateway.start()
    (tmp_path / "real").mkdir()
    real = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / "real", name="real-node")
    impostor = None
    try:
        real.start()
        key = gateway.create_api_key("identity")
        headers = {"Authorization": f"Bearer {key}"}
        wait_for(lambda: (tmp_path / "real" / "node_secret").exists(), 60, "the node to get its secret")
        node_id = (tmp_path / "real" / "node_id").read_text().strip()
        assert (tmp_path / "real" / "node_secret").stat().st_mode & 0o077 == 0
        wait_for(lambda: _node_field(gateway, node_id, "connected") == "True", 30, "the link")
        time.sleep(3)  # long enough for the model to be online, were the node routed anything
        assert _node_field(gateway, node_id, "approved") == "False"
        models = httpx.get(gateway.url + "/v1/models", headers=headers, timeout=10).json()["data"]
        assert models == [], "a node nobody approved is routed nothing"
        admin = gateway.admin_browser("approver", "a-long-approver-password")
        node_pk = _node_field(gateway, node_id, "pk")
        assert "waiting for approval" in admin.get("/manage/nodes/").text
        approved = admin.post(f"/manage/nodes/{node_pk}/activation/",
                              data={"activated": "true", "csrfmiddlewaretoken": admin.cookies["csrftoken"]})
        assert approved.status_code == 302
        real.wait_for_model(MODEL_ID, timeout_s=60)

        # The impostor knows the id (not the secret) and holds the shared access key.
        (tmp_path / "impostor").mkdir()
        shutil.copy(tmp_path / "real" / "node_id", tmp_path / "impostor" / "node_id")
        impostor = NodeAgent(gateway=gateway, models_dir=models_dir, state_dir=tmp_path / "impostor",
                             name="impostor", enable=())
        impostor.start()
        wait_for(lambda: "identity proof" in impostor.log(), 30, "the impostor to be refused")
        assert _node_field(gateway, node_id, "name") == "real-node"
        assert _node_field(gateway, node_id, "last_error") == "", "nothing unauthenticated writes the node's row"
        reply = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        assert reply.status_code == 200
        assert "request" not in impostor.log().split("refused")[-1], "the impostor received no prompt"

        # The real node restarts (same state folder) and links again at once, secret and all.
        assert real.stop() == 0
        real.start()
        real.wait_for_model(MODEL_ID, timeout_s=60)
    finally:
        if impostor is not None:
            impostor.stop()
        real.stop()
        gateway.stop()
