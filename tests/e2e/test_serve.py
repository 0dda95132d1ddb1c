"""The run command's own steps: bootstrap prints the admin login and an API key once; serve starts
the gateway and a local node, prints where they are, and stops both cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import MODEL_ID
from tests.processes import REPO, base_env, free_port

pytestmark = pytest.mark.e2e


def _manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    return result.stdout


def _agents(pid: int) -> list[psutil.Process]:
    """The node agents that `pid` runs now (a killed one not yet reaped is a zombie: not counted)."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if "node_agent" in child.cmdline():
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_bootstrap_and_serve_bring_up_a_working_gateway_and_local_node(tmp_path: Path, models_dir: Path) -> None:
    env = base_env(OPTIMAGPT_DATA_DIR=str(tmp_path))
    _manage(env, "migrate", "--verbosity", "0")
    first = _manage(env, "bootstrap")
    password = re.search(r"Admin login:\s+admin / (\S+)", first).group(1)
    api_key = re.search(r"API key:\s+(sk-optima-\S+)", first).group(1)
    second = _manage(env, "bootstrap")
    assert password not in second and "sk-optima-" not in second, "secrets are shown once only"

    port = free_port()
    serve = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port), "--models-dir",
                              str(models_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 90
        while not lines or not lines[-1].startswith("Ready."):
            assert time.monotonic() < deadline and serve.poll() is None, f"serve did not get ready: {lines}"
            lines.append(serve.stdout.readline().strip())
        output = "\n".join(lines)
        assert f"Gateway:       http://127.0.0.1:{port}/" in output
        assert f"Local node:    linked; serving {MODEL_ID}" in output

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)
        reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3)
        assert reply.usage.completion_tokens == 3

        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as browser:
            browser.get("/admin/login/")
            login = browser.post("/admin/login/?next=/admin/", data={
                "username": "admin", "password": password, "next": "/admin/",
                "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
            assert login.status_code == 302 and login.headers["location"] == "/admin/"

        # kill -9 of the local node: the gateway stays up and the node comes back by itself.
        (agent,) = _agents(serve.pid)
        agent.kill()
        assert client.models.list() is not None, "the gateway answers while the node is away"
        deadline = time.monotonic() + 60
        while True:
            assert serve.poll() is None, "serve stopped with its node"
            agents = _agents(serve.pid)
            if agents and agents[0].pid != agent.pid and MODEL_ID in {m.id for m in client.models.list().data}:
                break
            assert time.monotonic() < deadline, "the local node was not started again"
            time.sleep(0.5)
        reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=1)
        assert reply.usage.completion_tokens == 1

        children = psutil.Process(serve.pid).children(recursive=True)
        assert len(children) >= 3, "daphne, the node agent and its inference process"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        if serve.poll() is None:
            serve.kill()


def test_serve_links_its_local_node_over_wss_when_the_certificate_is_self_signed_for_localhost(
        tmp_path: Path, models_dir: Path) -> None:
    """A self-signed certificate made from the shell: serve's HTTPS is up from the start, its local node dials
    wss:// trusting exactly that certificate, and a new one made while it runs is served within the check
    interval (the embedded default has no broadcast) with the node's link kept."""
    import ssl

    https_port = free_port()
    env = base_env(OPTIMAGPT_DATA_DIR=str(tmp_path), OPTIMAGPT_HTTPS_PORT=str(https_port), OPTIMAGPT_TLS_CHECK_S="0.5")
    _manage(env, "migrate", "--verbosity", "0")
    api_key = re.search(r"API key:\s+(sk-optima-\S+)", _manage(env, "bootstrap")).group(1)
    assert "Applied" in _manage(env, "certificate", "--self-signed", "localhost, 127.0.0.1")
    port = free_port()
    serve = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port), "--models-dir",
                              str(models_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while not lines or not lines[-1].startswith("Ready."):
            assert time.monotonic() < deadline and serve.poll() is None, f"serve did not get ready: {lines}"
            lines.append(serve.stdout.readline().strip())
        assert f"HTTPS:         https://127.0.0.1:{https_port}/" in "\n".join(lines)
        (agent,) = _agents(serve.pid)
        assert f"https://localhost:{https_port}" in agent.cmdline()
        ca_file = tmp_path / "gateway-certificate.pem"
        client = openai.OpenAI(base_url=f"https://localhost:{https_port}/v1", api_key=api_key, max_retries=0,
                               http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file))))
        assert client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2).usage.completion_tokens == 2

        first = ca_file.read_text()
        assert "Applied" in _manage(env, "certificate", "--self-signed", "localhost, 127.0.0.1")
        deadline = time.monotonic() + 15
        while True:  # the running gateway notices the stored certificate changed and serves it
            new = ssl.get_server_certificate(("127.0.0.1", https_port))
            if new.strip() != first.strip():
                break
            assert time.monotonic() < deadline, "the new certificate was not served"
            time.sleep(0.3)
        assert _agents(serve.pid)[0].pid == agent.pid, "the local node kept its link and process"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
