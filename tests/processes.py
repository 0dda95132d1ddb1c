"""Real gateway (daphne) and node-agent processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

REPO = Path(__file__).resolve().parent.parent
NODE_ACCESS_KEY = "e2e-node-access-key"
METRICS_TOKEN = "e2e-metrics-token-0123456789"
START_TIMEOUT_S = 60.0


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll `predicate` until it returns something true, and return that; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(interval_s)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process whose output goes to a log file that tests can read."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def started(self) -> subprocess.Popen[bytes]:
        """The running process (a test that asks before start() has a bug)."""
        assert self.proc is not None, "start() first"
        return self.proc

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_listening(self, port: int, timeout_s: float) -> None:
        """Wait until something accepts connections on 127.0.0.1:`port`; fail the test if the process exits."""

        def listening() -> bool:
            assert self.alive, f"{self.log_path.name}: the process exited:\n{self.log()}"
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout_s, f"port {port} to listen ({self.log_path.name})")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM and wait; a process that does not stop in time is killed (and the test sees the code)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")}
    env.update(PYTHONUNBUFFERED="1", SECRET_KEY="e2e-secret-key-" + "x" * 40, OPTIMAGPT_NODE_ACCESS_KEY=NODE_ACCESS_KEY,
               # No gateway of the test run adopts a node listening on localhost:8022 unless its test asks.
               OPTIMAGPT_AUTO_CONNECT_ADDRESS="",
               # The test nodes dial in with new ids all the time; the approval test turns this off.
               OPTIMAGPT_NODE_AUTO_APPROVE="true",
               # Prometheus scrapes with this token (closed without one: tests/operations/test_endpoints.py).
               OPTIMAGPT_METRICS_TOKEN=METRICS_TOKEN)
    env.update(extra)
    return env


class Gateway(Process):
    """daphne serving the gateway; with `tls` (certificate file, key file) it serves HTTPS on localhost."""

    def __init__(self, *, data_dir: Path, port: int, tls: tuple[Path, Path] | None = None, **env: str) -> None:
        super().__init__(data_dir / "gateway.log")
        self.data_dir = data_dir
        self.port = port
        self.tls = tls
        self.url = f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"
        self.env = base_env(OPTIMAGPT_DATA_DIR=str(data_dir), **env)

    def manage(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=self.env, capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def nodes_query(self, expression: str) -> str:
        """What `expression` (over the Node model, e.g. `Node.objects.count()`) prints in the gateway's database."""
        return self.manage("shell", "--no-imports", "-c", f"from nodes.models import Node; print({expression})").strip()

    def node_linked(self, name: str) -> bool:
        """Whether the node called `name` has its link up now, as the gateway's database says."""
        return self.nodes_query(f"Node.objects.filter(name={name!r}, connected=True).exists()") == "True"

    def start(self, migrate: bool = True) -> None:
        if migrate:
            self.manage("migrate", "--verbosity", "0")
        if self.tls:
            cert, key = self.tls
            listen = ["-e", f"ssl:{self.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]
        else:
            listen = ["-b", "127.0.0.1", "-p", str(self.port)]
        self._spawn([sys.executable, "-m", "optimagpt.server", *listen], self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.alive, f"gateway exited:\n{self.log()}"
            try:
                with self.http() as client:
                    client.get("/v1/models", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError(f"gateway did not listen within {START_TIMEOUT_S} s:\n{self.log()}")

    def http(self) -> httpx.Client:
        verify = ssl.create_default_context(cafile=str(self.tls[0])) if self.tls else True
        return httpx.Client(base_url=self.url, verify=verify)

    def create_api_key(self, name: str) -> str:
        return self.manage("create_api_key", "--name", name).strip()

    def admin_browser(self, username: str, password: str) -> httpx.Client:
        """A new Admin, logged in through the login page; the client keeps the session and CSRF cookies."""
        subprocess.run([sys.executable, "manage.py", "create_user", username, "--type", "admin"], cwd=REPO,
                       env=self.env, input=password + "\n", text=True, check=True, capture_output=True)
        browser = self.http()
        browser.get("/login/")
        response = browser.post("/login/", data={"username": username, "password": password,
                                                 "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        assert response.status_code == 302, response.text
        return browser

    def chat_user(self, username: str, password: str) -> dict[str, str]:
        """A new User (OptimaChat only), signed in through the API: the headers that carry their access token."""
        subprocess.run([sys.executable, "manage.py", "create_user", username, "--type", "user"], cwd=REPO,
                       env=self.env, input=password + "\n", text=True, check=True, capture_output=True)
        with self.http() as client:
            response = client.post("/api/auth/login", json={"username": username, "password": password,
                                                            "deviceId": "tests"})
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def revoke_api_key(self, browser: httpx.Client, name: str) -> None:
        """Revoke the key called `name` on the API-keys page, as an admin would."""
        key_id = self.manage("shell", "--no-imports", "-c",
                             f"from accounts.models import ApiKey; print(ApiKey.objects.get(name={name!r}).pk)")
        response = browser.post(f"/manage/api-keys/{key_id.strip()}/revoke/",
                                data={"csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        assert response.status_code == 302


class NodeAgent(Process):
    def __init__(self, *, gateway: Gateway, models_dir: Path, state_dir: Path, access_key: str = NODE_ACCESS_KEY,
                 name: str = "e2e-node", extra_args: tuple[str, ...] = (),
                 enable: tuple[str, ...] = ("SmolLM2-*.gguf",)) -> None:
        super().__init__(state_dir / "agent.log")
        self.gateway = gateway
        self.argv = [sys.executable, "-m", "node_agent", "--gateway-url", gateway.url, "--models-dir",
                     str(models_dir), "--state-dir", str(state_dir), "--name", name, "--rescan-interval", "1",
                     *(f"--enable={pattern}" for pattern in enable), *extra_args]
        self.env = base_env(OPTIMAGPT_NODE_ACCESS_KEY=access_key, OPTIMAGPT_NODE_LOG_LEVEL="DEBUG")
        self.started_at = 0.0
        self.first_served_after_s: float | None = None  # from start to the first model listed, once

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._spawn(self.argv, self.env)

    def wait_for_model(self, model_id: str, timeout_s: float = START_TIMEOUT_S) -> float:
        """Wait until the gateway lists `model_id`; return the seconds since the agent started.

        The first time it is seen is kept in `first_served_after_s`, for tests that run much later.
        """
        key = self.gateway.create_api_key("wait-for-model")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.alive, f"node agent exited:\n{self.log()}"
            with self.gateway.http() as client:
                response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            if response.status_code == 200 and any(m["id"] == model_id for m in response.json()["data"]):
                elapsed = time.monotonic() - self.started_at
                if self.first_served_after_s is None:
                    self.first_served_after_s = elapsed
                return elapsed
            time.sleep(0.2)
        raise TimeoutError(f"{model_id} not served within {timeout_s} s:\n{self.log()}\n{self.gateway.log()}")


class SimulatedNodes(Process):
    """`python -m node_agent.simulator`: protocol-level nodes answering at a chosen speed, in one process."""

    def __init__(self, *, gateway: Gateway, log_dir: Path, count: int = 1, model: str = "sim", delay_s: float = 0.0,
                 tokens: int = 1, token_rate: float = 0.0, slots: int = 1, prefix: str = "sim",
                 heartbeat_interval_s: float = 2.0, metrics_interval_s: float = 2.0, reply: str = "",
                 tool_call: str = "", tool_args: str = "{}", tool_rounds: int = 1) -> None:
        super().__init__(log_dir / f"{prefix}.log")
        self.gateway = gateway
        self.count = count
        self.argv = [sys.executable, "-m", "node_agent.simulator", "--gateway-url", gateway.url, "--nodes", str(count),
                     "--model", model, "--delay", str(delay_s), "--tokens", str(tokens), "--token-rate",
                     str(token_rate), "--slots", str(slots), "--prefix", prefix,
                     "--heartbeat-interval", str(heartbeat_interval_s), "--metrics-interval", str(metrics_interval_s),
                     "--reply", reply, "--tool-call", tool_call, "--tool-args", tool_args,
                     "--tool-rounds", str(tool_rounds)]
        self.env = base_env()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start, and wait until every node is linked."""
        self._spawn(self.argv, self.env)
        deadline = time.monotonic() + timeout_s
        while f"linked {self.count}/{self.count}" not in self.log():
            assert self.alive, f"simulator exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"simulated nodes not linked in {timeout_s} s:\n{self.log()}"
            time.sleep(0.1)


class McpTestServer(Process):
    """tests/mcp/server.py: a real MCP server (the SDK's MCPServer over Streamable HTTP, or SSE) on a free port."""

    def __init__(self, *, log_dir: Path, token: str = "", notes: Path | None = None, transport: str = "streamable-http",
                 port: int | None = None, redirect_to: str = "") -> None:
        super().__init__(log_dir / f"mcp-{transport}.log")
        self.port = port or free_port()
        self.path = "/sse" if transport == "sse" else "/mcp"
        self.url = f"http://127.0.0.1:{self.port}{self.path}"
        self.argv = [sys.executable, "-m", "tests.mcp.server", "--port", str(self.port), "--transport", transport]
        if token:
            self.argv += ["--token", token]
        if notes is not None:
            self.argv += ["--notes", str(notes)]
        if redirect_to:
            self.argv += ["--redirect-to", redirect_to]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self._spawn(self.argv, base_env())
        self._wait_listening(self.port, timeout_s)


EVERYTHING = REPO / "tests/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js"


class EverythingServer(Process):
    """@modelcontextprotocol/server-everything from npm (tests/mcp/package.json), in its Streamable HTTP mode."""

    def __init__(self, *, log_dir: Path) -> None:
        super().__init__(log_dir / "server-everything.log")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self._spawn(["node", str(EVERYTHING), "streamableHttp"], base_env(PORT=str(self.port)))
        self._wait_listening(self.port, timeout_s)


# -- the MCP servers page, as an admin uses it (the browser: Gateway.admin_browser) ----------------------------
def mcp_server_id(browser: httpx.Client, name: str) -> int:
    listed = browser.get("/manage/mcp-servers/?format=json").json()["data"]
    return int(next(s["id"] for s in listed if s["name"] == name))


def mcp_server_add(browser: httpx.Client, name: str, **fields: str) -> dict[str, Any]:
    """Add an MCP server on the page (`url` and `token`, or a stdio `command`), and have it checked at once, as
    the page's script asks; what the check answered (the server as the page's script sees it)."""
    response = browser.post("/manage/mcp-servers/", data={
        "name": name, **fields, "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
    assert response.status_code == 302, response.text
    checked = browser.post(f"/manage/mcp-servers/{mcp_server_id(browser, name)}/refresh/", headers={
        "Accept": "application/json", "X-CSRFToken": browser.cookies["csrftoken"]})
    assert checked.status_code == 200, checked.text
    answer: dict[str, Any] = checked.json()
    return answer


def mcp_server_delete(browser: httpx.Client, pk: int) -> None:
    response = browser.post(f"/manage/mcp-servers/{pk}/delete/",
                            data={"csrfmiddlewaretoken": browser.cookies["csrftoken"]})
    assert response.status_code == 302
