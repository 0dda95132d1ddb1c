"""Run the gateway (daphne) and, by default, a local node agent beside it; stop both on Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess  # nosec B404 # our own interpreter with argument lists, never a shell
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from certificates.services import certificate_in_force, chain_in_force
from node_agent.default_model import CATALOG, DEFAULT_MODEL
from node_agent.link import load_node_id
from nodes.models import Executor
from nodes.services import node_preregister

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
# A local node agent that dies is started again after 1 s, then 2, 4... up to 30 s while it keeps dying.
AGENT_BACKOFF_S = 1.0
AGENT_BACKOFF_MAX_S = 30.0
AGENT_STABLE_S = 60.0


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Command(BaseCommand):
    help = "Serve the gateway with daphne, and a local node agent for the models in --models-dir."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--models-dir", default=str(settings.BASE_DIR / "models"))
        parser.add_argument("--no-local-node", action="store_true", help="run the gateway alone")

    def handle(self, *args: Any, host: str, port: int, models_dir: str, no_local_node: bool, **options: Any) -> None:
        if _port_open(host, port):
            raise CommandError(f"{host}:{port} is already in use; pick another with --port")
        stopping = False

        def request_stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        children: list[subprocess.Popen[bytes]] = [subprocess.Popen(  # nosec B603 # argv of our own interpreter and modules, no shell, no user input
            [sys.executable, "-m", "optimagpt.server", "-b", host, "-p", str(port)])]
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # nosec B104 # compares the bind address the admin chose; it binds nothing
        state_dir = Path(settings.DATA_DIR) / "local-node"

        def agent_argv() -> list[str]:
            # Made again at each start of the agent: the certificate may have changed since the last one.
            return [sys.executable, "-m", "node_agent", "--gateway-url", self._local_link(url), "--models-dir",
                    models_dir, "--name", "Local Node", "--state-dir", str(state_dir),
                    "--enable", CATALOG[DEFAULT_MODEL].filename]

        if not no_local_node:
            # Our own node, on this machine: approved before it first links (others wait for an admin).
            node_preregister(node_id=load_node_id(state_dir), name="Local Node")
        try:
            self._wait(lambda: _port_open(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port),  # nosec B104 # compares the bind address the admin chose; it binds nothing
                       children, "the gateway to listen")
            self.stdout.write(f"Gateway:       {url}/   (OpenAI API at {url}/v1, admin at {url}/admin/)")
            summary, _ = certificate_in_force()
            if summary is not None and settings.OPTIMAGPT_HTTPS_PORT:
                https_host = url.split("://", 1)[1].rsplit(":", 1)[0]
                self.stdout.write(f"HTTPS:         https://{https_host}:{settings.OPTIMAGPT_HTTPS_PORT}/   "
                                  f"(certificate for {', '.join(summary.names) or summary.subject})")
            if not no_local_node:
                # The default model starts by itself; other files appear offline until an admin starts them.
                children.append(subprocess.Popen(agent_argv()))  # nosec B603 # argv of our own interpreter and modules, no shell, no user input
                self._wait(lambda: Executor.objects.filter(state=Executor.State.ONLINE,
                                                           node__connected=True).exists(),
                           children, "the local node's first model")
                models = sorted(set(Executor.objects.filter(state=Executor.State.ONLINE)
                                    .values_list("model_id", flat=True)))
                self.stdout.write(f"Local node:    linked; serving {', '.join(models)}")
            self.stdout.write("Ready. Press Ctrl-C to stop.")
            self.stdout.flush()
            self._supervise(children, agent_argv, lambda: stopping)
        finally:
            self._stop(children)
        gateway = children[0]
        if gateway.returncode not in (0, -signal.SIGTERM, None) and not stopping:
            raise CommandError(f"the gateway exited with code {gateway.returncode}")

    def _local_link(self, url: str) -> str:
        """The local node dials wss:// when the certificate in force is self-signed for localhost, trusting exactly
        that certificate; otherwise ws:// over loopback (a CA's certificate does not name localhost, and loopback
        traffic never leaves this machine)."""
        summary, source = certificate_in_force()
        if summary is None or not summary.self_signed or "localhost" not in summary.names \
                or not settings.OPTIMAGPT_HTTPS_PORT:
            return url
        ca_file = Path(settings.DATA_DIR) / "gateway-certificate.pem"
        ca_file.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain_in_force(source)))
        os.environ["OPTIMAGPT_GATEWAY_CA_FILE"] = str(ca_file)  # the agent's --ca-file, through its environment
        return f"https://localhost:{settings.OPTIMAGPT_HTTPS_PORT}"

    def _supervise(self, children: list[subprocess.Popen[bytes]], agent_argv: Callable[[], list[str]],
                   stopping: Callable[[], bool]) -> None:
        """Until asked to stop or the gateway ends: a local node agent that dies is started again, with backoff.

        The gateway serves other nodes and remote upstreams too; it must not go down with the local one.
        """
        backoff = AGENT_BACKOFF_S
        started = time.monotonic()
        restart_at: float | None = None
        while not stopping() and children[0].poll() is None:
            agent = children[1] if len(children) > 1 else None
            if agent is not None and agent.poll() is not None:
                now = time.monotonic()
                if restart_at is None:
                    if now - started > AGENT_STABLE_S:
                        backoff = AGENT_BACKOFF_S  # it ran well for a while: no crash loop to slow down
                    restart_at = now + backoff
                    self.stderr.write(f"The local node exited (code {agent.returncode}); "
                                      f"starting it again in {backoff:.0f} s.")
                    backoff = min(backoff * 2, AGENT_BACKOFF_MAX_S)
                elif now >= restart_at:
                    children[1] = subprocess.Popen(agent_argv())  # nosec B603 # argv of our own interpreter and modules, no shell, no user input
                    started, restart_at = now, None
            time.sleep(0.25)

    def _wait(self, ready: Any, children: list[subprocess.Popen[bytes]], what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready():
            if any(child.poll() is not None for child in children):
                raise CommandError(f"stopped while waiting for {what}: a process exited")
            if time.monotonic() > deadline:
                raise CommandError(f"timed out after {READY_TIMEOUT_S:.0f} s waiting for {what}")
            time.sleep(0.25)

    def _stop(self, children: list[subprocess.Popen[bytes]]) -> None:
        # The node first, so its inference processes end before the gateway they serve.
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
