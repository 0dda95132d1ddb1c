"""Node enrollment end to end, with a real gateway and real node agents: an admin's token, `python -m node_agent
join`, the link with the node's own credential (no shared key), and each way it is refused: the node deleted,
a single-use token used again, an expired or revoked token, another node's id, a plain http:// gateway
elsewhere. No token or credential shows in a page, a log or an API answer after it was made."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_chat_browser import PASSWORD
from tests.processes import NODE_ACCESS_KEY, REPO, Gateway, NodeAgent, base_env, free_port, wait_for

pytestmark = pytest.mark.e2e



def _join(gateway_url: str, state: Path, name: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in base_env(OPTIMAGPT_ENROLLMENT_TOKEN=token).items() if k != "OPTIMAGPT_NODE_ACCESS_KEY"}
    return subprocess.run([sys.executable, "-m", "node_agent", "join", "--gateway-url", gateway_url, "--state-dir",
                           str(state), "--name", name], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_a_node_enrolls_with_a_token_links_without_the_shared_key_and_is_refused_once_deleted(tmp_path: Path) -> None:
    gateway = Gateway(data_dir=tmp_path, port=free_port(), OPTIMAGPT_NODE_AUTO_APPROVE="false")
    empty = tmp_path / "models"
    empty.mkdir()
    agents: list[NodeAgent] = []

    def agent(state: Path, name: str) -> NodeAgent:
        node = NodeAgent(gateway=gateway, models_dir=empty, state_dir=state, name=name)
        node.env.pop("OPTIMAGPT_NODE_ACCESS_KEY")  # an enrolled node has no shared key at all
        agents.append(node)
        return node

    try:
        gateway.start()
        token = gateway.manage("create_enrollment_token", "--ttl", "600", "--uses", "1", "--name", "box").strip()
        assert token.startswith("oge-")
        joined = _join(gateway.url, tmp_path / "a", "enrolled-a", token)
        assert joined.returncode == 0, joined.stderr
        credential = (tmp_path / "a/node_secret").read_text().strip()
        assert stat.S_IMODE((tmp_path / "a/node_secret").stat().st_mode) == 0o600
        assert token not in joined.stdout + joined.stderr and credential not in joined.stdout + joined.stderr
        node_a = agent(tmp_path / "a", "enrolled-a")
        node_a.start()
        wait_for(lambda: gateway.node_linked("enrolled-a"), 30, "the enrolled node linked")
        # Enrolled means approved: the admin made the token (new nodes wait here: auto-approve is off).
        assert gateway.nodes_query("Node.objects.get(name='enrolled-a').approved") == "True"

        again = _join(gateway.url, tmp_path / "b", "enrolled-b", token)
        assert again.returncode == 1 and "used up" in again.stderr

        short = gateway.manage("create_enrollment_token", "--ttl", "1").strip()
        time.sleep(1.5)
        expired = _join(gateway.url, tmp_path / "c", "late", short)
        assert expired.returncode == 1 and "expired" in expired.stderr

        plain = _join("http://gateway.example.org", tmp_path / "d", "plain", token)
        assert plain.returncode == 2 and "plain http://" in plain.stderr

        # A token made and revoked on the Nodes page: refused; the page showed it once only.
        browser = gateway.admin_browser("enroller", PASSWORD)
        page = browser.post("/manage/nodes/enrollment/", data={"name": "page", "ttl_hours": "1", "uses": "2",
                                                               "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        page_token = re.search(r'data-field="token">([^<]+)<', page.text).group(1)
        listing = browser.get("/manage/nodes/").text
        assert page_token not in listing and token not in listing and "0 of 2" in listing and "1 of 1" in listing
        token_pk = gateway.manage("shell", "-c", "from nodes.models import EnrollmentToken as T; "
                                  "print(T.objects.get(name='page').pk)").strip().splitlines()[-1]
        assert browser.post(f"/manage/nodes/enrollment/{token_pk}/revoke/",
                            data={"csrfmiddlewaretoken": browser.cookies["csrftoken"]}).status_code == 302
        revoked = _join(gateway.url, tmp_path / "e", "revoked", page_token)
        assert revoked.returncode == 1 and "revoked" in revoked.stderr
        assert "revoked" in browser.get("/manage/nodes/").text

        # Another node's id with its own credential: refused, and the real node keeps its link.
        second = gateway.manage("create_enrollment_token", "--ttl", "600").strip()
        assert _join(gateway.url, tmp_path / "f", "impostor", second).returncode == 0
        (tmp_path / "f/node_id").write_text((tmp_path / "a/node_id").read_text())
        impostor = agent(tmp_path / "f", "impostor")
        impostor.start()
        wait_for(lambda: "gateway refused the link" in impostor.log(), 30, "the impostor refused")
        assert gateway.node_linked("enrolled-a")

        # Deleting the node revokes its credential at once: its link ends and its handshakes are refused.
        node_pk = gateway.nodes_query("Node.objects.get(name='enrolled-a').pk")
        assert browser.post(f"/manage/nodes/{node_pk}/delete/",
                            data={"csrfmiddlewaretoken": browser.cookies["csrftoken"]}).status_code == 302
        wait_for(lambda: "this node is not enrolled here" in node_a.log(), 30, "the deleted node refused")
        assert not gateway.node_linked("enrolled-a")

        texts = [gateway.log(), browser.get("/manage/nodes/").text, *(a.log() for a in agents)]
        for secret in (token, short, page_token, second, credential):
            assert not [t for t in texts if secret in t], "a token or credential shows"
        assert NODE_ACCESS_KEY not in "".join(a.log() for a in agents)
    finally:
        for node in agents:
            node.stop()
        gateway.stop()

