"""The agent's side of the node link.

`NodeSession` runs one link over any open socket with `send`, `recv` and
`close` (the websockets connection of either side), so the dialing loop here and
a listening server share every line past the socket's opening.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from . import __version__, logship
from .executors import ExecutorManager, SettingsError
from .hardware import Gpus, hardware_info, metrics_sample
from .protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_HEARTBEAT_LOST,
    CLOSE_REPLACED,
    HANDSHAKE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    OP_CONFIGURE,
    PROTOCOL_VERSION,
    auth_message,
    error_event,
    new_nonce,
    open_node_secret,
    redial_delay,
    split_message,
    watch_silence,
    welcome_proven,
)
from .settings import AgentSettings

log = logging.getLogger("node_agent.link")

LOG_REPORT_INTERVAL_S = 1.0


class Socket(Protocol):
    async def send(self, message: str) -> None: ...
    async def recv(self) -> str | bytes: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class HandshakeRefused(Exception):
    """The other side failed to prove it holds the access key, or refused ours."""


def load_node_id(state_dir: Path) -> str:
    """The node's identity, made once and kept, so the gateway knows it across restarts."""
    path = state_dir / "node_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        node_id = str(uuid.uuid4())
        path.write_text(node_id + "\n")
        return node_id


class NodeSecret:
    """The secret the gateway gave this node on its first link, kept in the state folder for this user only."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "node_secret"

    def load(self) -> str:
        try:
            return self.path.read_text().strip()
        except FileNotFoundError:
            return ""

    def save(self, secret: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.touch(mode=0o600)
        partial.write_text(secret + "\n")
        os.replace(partial, self.path)


class NodeSession:
    """One authenticated link: requests in, events out, heartbeats both ways."""

    def __init__(self, socket: Socket, *, settings: AgentSettings, node_id: str, manager: ExecutorManager,
                 gpus: Gpus, peer: str = "") -> None:
        self.socket = socket
        self.peer = peer or settings.link_url
        self.settings = settings
        self.node_id = node_id
        self.manager = manager
        self.gpus = gpus
        self.heartbeat_interval_s = settings.heartbeat_interval_s
        # request id -> (LlamaCppProcess, the timer that cancels it at its deadline)
        self._in_flight: dict[str, tuple[Any, asyncio.TimerHandle | None]] = {}
        self._parts: dict[str, list[str]] = {}  # request id -> the parts of a long message so far
        self._last_heard = time.monotonic()
        self._executors_dirty = asyncio.Event()
        self._control_tasks: set[asyncio.Task[None]] = set()

    async def _send(self, message: dict[str, Any]) -> None:
        for piece in split_message("", json.dumps(message, separators=(",", ":"))):
            await self.socket.send(piece)

    async def _recv(self) -> dict[str, Any]:
        return (await self._recv_raw())[1]

    async def _recv_raw(self) -> tuple[str, dict[str, Any]]:
        raw = await self.socket.recv()
        self._last_heard = time.monotonic()
        message = json.loads(raw)
        if not isinstance(message, dict):
            raise ValueError("message is not an object")
        return raw if isinstance(raw, str) else raw.decode(), message

    async def handshake(self) -> None:
        """Prove we hold the key, and make the gateway prove it too. Raises HandshakeRefused."""
        hello = await asyncio.wait_for(self._recv(), HANDSHAKE_TIMEOUT_S)
        if hello.get("type") != "hello" or hello.get("protocol") != PROTOCOL_VERSION:
            raise HandshakeRefused(f"unexpected greeting {hello.get('type')!r}, protocol {hello.get('protocol')!r}")
        gateway_nonce = str(hello.get("nonce", ""))
        node_nonce = new_nonce()
        store = NodeSecret(self.settings.state_dir)
        secret = await asyncio.to_thread(store.load)
        # An enrolled node proves its own credential (its node secret) where others prove the shared key.
        enrolled = self.settings.enrolled and bool(secret)
        key = secret if enrolled else self.settings.current_access_key()
        auth = auth_message(key=key, hello=hello, node_id=self.node_id, node_nonce=node_nonce,
                            name=self.settings.name, version=__version__, node_secret=secret)
        if enrolled:
            auth["enrolled"] = True
        await self._send(auth)
        reply = await asyncio.wait_for(self._recv(), HANDSHAKE_TIMEOUT_S)
        if reply.get("type") == "refused":
            raise HandshakeRefused(f"gateway refused the link: {reply.get('reason', 'no reason given')}")
        if not welcome_proven(reply, key=key, auth=auth, hello=hello):
            await self.socket.close(CLOSE_AUTH_FAILED, "gateway failed to prove the access key")
            raise HandshakeRefused("the gateway could not prove it holds the access key")
        self.heartbeat_interval_s = float(reply.get("heartbeat_interval_s") or self.heartbeat_interval_s)
        sealed = reply.get("node_secret")
        if isinstance(sealed, str):
            try:
                given = open_node_secret(sealed, key, gateway_nonce, node_nonce, self.node_id)
            except ValueError:
                raise HandshakeRefused("the gateway sent an unreadable node secret") from None
            await asyncio.to_thread(store.save, given)
            log.info("the gateway gave this node its identity secret (kept in %s)", store.path)

    async def run(self) -> None:
        """Authenticate, then serve the link until it drops."""
        await self.handshake()
        await self.serve()

    async def serve(self) -> None:
        """Serve an authenticated link until it drops; requests still running are cancelled on the way out."""
        await self._send({
            "type": "register",
            "hardware": hardware_info(self.gpus),
            "executors": self.manager.describe(),
        })
        log.info("linked to %s as %s", self.peer, self.settings.name)
        tasks = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._report_executors()),
            asyncio.create_task(self._report_metrics()),
            asyncio.create_task(self._report_logs()),
        ]
        try:
            while True:
                await self._handle(*await self._recv_raw())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._in_flight:
                # Nobody will read these replies: free the processes for the next link's requests.
                log.info("link closed with %d request(s) in flight; cancelling them", len(self._in_flight))
            for rid in list(self._in_flight):
                self._cancel(rid)

    def executors_changed(self) -> None:
        self._executors_dirty.set()

    async def _handle(self, raw: str, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "part":
            await self._part(message)
        elif kind == "request":
            await self._start_request(raw, message)
        elif kind == "cancel":
            self._cancel(str(message.get("id")))
        elif kind == "ping":
            await self._send({"type": "pong", "t": message.get("t")})
        elif kind == "pong":
            pass
        else:
            log.debug("ignoring message of type %r", kind)

    async def _part(self, message: dict[str, Any]) -> None:
        """Collect a long gateway message sent in parts; handle it whole once its last part came."""
        rid, data = message.get("id"), message.get("data")
        if not isinstance(rid, str) or not isinstance(data, str):
            return
        parts = self._parts.setdefault(rid, [])
        parts.append(data)
        if sum(map(len, parts)) > MAX_MESSAGE_BYTES:
            del self._parts[rid]
            await self._send(error_event(rid, f"The request is larger than {MAX_MESSAGE_BYTES} bytes.",
                                         code="request_too_large", status=413))
            return
        if not message.get("more"):
            raw = "".join(self._parts.pop(rid))
            try:
                whole = json.loads(raw)
            except (ValueError, RecursionError):
                log.warning("dropping a message in parts that joined to no JSON (request %.40s)", rid)
                return
            if isinstance(whole, dict) and whole.get("type") != "part":
                await self._handle(raw, whole)

    async def _start_request(self, raw: str, message: dict[str, Any]) -> None:
        rid = str(message.get("id"))
        if message.get("op") == OP_CONFIGURE:
            # Applying may restart processes for seconds: not on the loop that reads the link.
            task = asyncio.create_task(self._configure(rid, message))
            self._control_tasks.add(task)
            task.add_done_callback(self._control_tasks.discard)
            return
        executor = self.manager.executors.get(str(message.get("executor")))

        async def forward(raw: str, event: dict[str, Any]) -> None:
            if event.get("type") in ("end", "error"):
                self._forget(rid)
            with contextlib.suppress(Exception):  # the link may have dropped meanwhile
                for piece in split_message(rid, raw):
                    await self.socket.send(piece)

        # The worker reads op, id, stream and body from the message itself: pass it on untouched.
        process = None
        if executor is not None and isinstance(message.get("body"), dict):
            process = executor.submit(rid, raw, forward)
        if process is None:
            state = executor.state if executor is not None else "unknown"
            await self._send(error_event(rid, f"executor {message.get('executor')!r} is not ready (state {state})",
                                         code="executor_unavailable", status=503))
            return
        # Work the gateway has given up on stops here too, even if its cancel never arrives.
        deadline_s = message.get("deadline_s")
        timer = None
        if isinstance(deadline_s, (int, float)) and deadline_s > 0:
            timer = asyncio.get_running_loop().call_later(float(deadline_s), self._cancel, rid)
        self._in_flight[rid] = (process, timer)

    def _forget(self, rid: str) -> Any:
        """Stop tracking `rid`; its process, or None if it was not in flight."""
        entry = self._in_flight.pop(rid, None)
        if entry is None:
            return None
        process, timer = entry
        if timer is not None:
            timer.cancel()
        return process

    def _cancel(self, rid: str) -> None:
        process = self._forget(rid)
        if process is not None:
            process.cancel(rid)

    async def _configure(self, rid: str, message: dict[str, Any]) -> None:
        """Change an executor's settings at the gateway's request; answer with its new description."""
        try:
            described = await self.manager.configure(str(message.get("executor")), message.get("body"))
            reply: dict[str, Any] = {"type": "end", "id": rid, "executor": described}
        except SettingsError as exc:
            reply = error_event(rid, str(exc), code="invalid_settings", status=400)
        except Exception as exc:
            log.exception("configuring %s failed", message.get("executor"))
            reply = error_event(rid, f"the node failed to apply the settings: {type(exc).__name__}",
                                code="node_error", status=500)
        with contextlib.suppress(Exception):  # the link may have dropped meanwhile
            await self._send(reply)

    async def _heartbeat(self) -> None:
        """Ping every interval; drop the link when the gateway has been silent for 2.75 intervals (checked four
        times an interval, so within three)."""
        async def lost(silent_s: float) -> None:
            log.warning("gateway silent for %.1f s; dropping the link", silent_s)
            await self.socket.close(CLOSE_HEARTBEAT_LOST, "heartbeat lost")

        await watch_silence(interval_s=self.heartbeat_interval_s, last_heard=lambda: self._last_heard,
                            ping=lambda: self._send({"type": "ping", "t": time.time()}), lost=lost)

    async def _report_executors(self) -> None:
        while True:
            await self._executors_dirty.wait()
            self._executors_dirty.clear()
            await self._send({"type": "executors", "executors": self.manager.describe()})
            await asyncio.sleep(0.2)  # coalesce bursts of state changes

    async def _report_logs(self) -> None:
        """Ship the agent's log lines once a second (lines logged while unlinked wait in a bounded buffer)."""
        while True:
            await asyncio.sleep(LOG_REPORT_INTERVAL_S)
            while records := logship.handler.take():
                await self._send({"type": "logs", "records": records})

    async def _report_metrics(self) -> None:
        while True:
            await self._send({"type": "metrics", "metrics": metrics_sample(self.gpus)})
            await asyncio.sleep(self.settings.metrics_interval_s)


class _Link:
    """What the agent's two ways of linking share: the current session, told when the executors change."""

    def __init__(self, *, settings: AgentSettings, node_id: str, manager: ExecutorManager, gpus: Gpus) -> None:
        self.settings = settings
        self.node_id = node_id
        self.manager = manager
        self.gpus = gpus
        self.session: NodeSession | None = None

    def executors_changed(self) -> None:
        if self.session is not None:
            self.session.executors_changed()


class Dialer(_Link):
    """Keeps a link to the gateway open: dial, run a session, back off with jitter, dial again."""

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.settings.link_url.startswith("wss://"):
            return None
        context = ssl.create_default_context(cafile=self.settings.ca_file)
        return context

    async def run_forever(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.typing import Origin

        failures = 0
        while True:
            started = time.monotonic()
            try:
                # The gateway checks Origin against its allowed hosts, as for any WebSocket.
                async with connect(self.settings.link_url, ssl=self._ssl(), open_timeout=10,
                                   origin=Origin(self.settings.origin),
                                   ping_interval=None, max_size=MAX_MESSAGE_BYTES,
                                   close_timeout=5) as socket:
                    self.session = NodeSession(socket, settings=self.settings, node_id=self.node_id,
                                               manager=self.manager, gpus=self.gpus)
                    await self.session.run()
            except asyncio.CancelledError:
                raise
            except HandshakeRefused as exc:
                log.error("%s", exc)
            except Exception as exc:  # noqa: BLE001 - any failure of a link means: dial again
                log.warning("link to %s lost: %s: %s", self.settings.link_url, type(exc).__name__, exc)
            finally:
                self.session = None
            # A link that stayed up a while was healthy; start the backoff over.
            failures, delay = redial_delay(failures, time.monotonic() - started)
            log.info("dialing again in %.1f s", delay)
            await asyncio.sleep(delay)


class Listener(_Link):
    """Listen mode: gateways dial this node (port 8022, wss with the node's own certificate).

    Each connection runs the same NodeSession as a dialed link. A connection that
    proves the access key replaces the link before it (a restarted gateway's new
    socket must not wait for the old one's heartbeats to lapse); one that does not
    prove it changes nothing.
    """

    async def run_forever(self) -> None:
        from websockets.asyncio.server import serve

        from .tls import ensure_certificate, fingerprint_of_file, server_context

        assert self.settings.listen is not None
        host, port = self.settings.listen
        cert, key = await asyncio.to_thread(ensure_certificate, self.settings.state_dir)
        log.info("listening on wss://%s:%d; certificate SHA-256 %s", host or "*", port,
                 await asyncio.to_thread(fingerprint_of_file, cert))
        async with serve(self._connection, host or None, port, ssl=server_context(cert, key),
                         max_size=MAX_MESSAGE_BYTES, ping_interval=None, close_timeout=5, open_timeout=10):
            await asyncio.Future()  # until cancelled

    async def _connection(self, socket: Any) -> None:
        host, port = socket.remote_address[:2]
        peer = f"{host}:{port}"
        session = NodeSession(socket, settings=self.settings, node_id=self.node_id, manager=self.manager,
                              gpus=self.gpus, peer=peer)
        try:
            await session.handshake()
        except HandshakeRefused as exc:
            log.error("refused a gateway from %s: %s", peer, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a scanner or a dropped socket: nothing to serve
            log.info("connection from %s ended before the handshake: %s", peer, type(exc).__name__)
            return
        previous, self.session = self.session, session
        if previous is not None:
            log.info("a gateway linked again from %s; closing the older link", peer)
            await previous.socket.close(CLOSE_REPLACED, "replaced by a newer link")
        from websockets.exceptions import ConnectionClosedOK

        try:
            await session.serve()
        except ConnectionClosedOK:
            log.info("link from %s closed by the gateway", peer)  # a verification, a shutdown: normal
        except Exception as exc:  # noqa: BLE001 - the gateway went away; it dials again
            log.warning("link from %s lost: %s: %s", peer, type(exc).__name__, exc)
        finally:
            if self.session is session:
                self.session = None
