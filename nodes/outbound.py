"""Gateway-initiated links: the gateway dials nodes that listen (the "New Node" flow and the Local Node).

Past the opening of the socket, a dialed link is the same as one a node opens:
`run_consumer_over` drives NodeLinkConsumer (the Channels consumer of node
links) over the outbound socket, so both ways share every line of session code.

Exactly one gateway process dials each node: a process claims a node with a
lease in the database (an UPDATE that only matches a free or expired lease, or
its own) and renews it while it runs; a process that dies lets its leases lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from node_agent.protocol import (
    CLOSE_AUTH_FAILED,
    HANDSHAKE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    NOT_THE_PROTOCOL,
    hello_message,
    new_nonce,
    redial_delay,
    welcome_message,
)
from node_agent.settings import LINK_PATH
from node_agent.tls import fingerprint_of_der, pinning_client_context
from operations.nodekeys import current_key, handshake_key

from . import services
from .consumers import NodeLinkConsumer

log = logging.getLogger("optimagpt.nodes.outbound")

OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
LEASE_S = 15.0
TICK_S = 2.0
CONNECT_TIMEOUT_S = 10.0
AUTO_CONNECT_EVERY_S = 10.0


class ProbeFailed(Exception):
    """Verifying a node failed; the message says which cause it was, as far as it can tell."""


@dataclass(frozen=True)
class ProbeResult:
    node_id: str
    name: str
    version: str
    fingerprint: str
    hardware: dict[str, Any]
    executors: int


def _url(host: str, port: int) -> str:
    return f"wss://{f'[{host}]' if ':' in host else host}:{port}{LINK_PATH}"


def _peer_fingerprint(ws: Any) -> str:
    ssl_object = ws.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ProbeFailed("the node presented no certificate")
    return fingerprint_of_der(der)


async def _open(host: str, port: int) -> Any:
    """An open wss socket to host:port, or ProbeFailed naming the likely cause."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidURI

    where = f"{host}:{port}"
    try:
        # TCP alone first: "nothing there" and "something there that is not a node" need different advice.
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        writer.close()
    except ConnectionRefusedError:
        raise ProbeFailed(f"nothing is listening on {where}: is the node service running, and is the port "
                          "right?") from None
    except socket.gaierror:
        raise ProbeFailed(f"the address {host!r} cannot be resolved") from None
    except TimeoutError:
        raise ProbeFailed(f"no answer from {where} within {CONNECT_TIMEOUT_S:.0f} s: a firewall, or a wrong "
                          "address") from None
    except OSError as exc:
        raise ProbeFailed(f"cannot connect to {where}: {exc.strerror or exc}") from None
    try:
        return await connect(_url(host, port), ssl=pinning_client_context(), open_timeout=CONNECT_TIMEOUT_S,
                             ping_interval=None, max_size=MAX_MESSAGE_BYTES, close_timeout=5)
    except TimeoutError:
        raise ProbeFailed(f"TLS failed: {where} accepts connections but did not answer the TLS handshake: is it "
                          "an OptimaGPT node in listen mode, or another service on that port?") from None
    except ssl.SSLError as exc:
        raise ProbeFailed(f"TLS failed with {where} ({exc.reason or exc}): is it an OptimaGPT node in listen "
                          "mode?") from None
    except (InvalidHandshake, InvalidURI, OSError) as exc:
        raise ProbeFailed(f"{where} did not open a node link ({type(exc).__name__}): is it an OptimaGPT "
                          "node?") from None


async def node_probe(*, host: str, port: int, expected_fingerprint: str = "") -> ProbeResult:
    """Connect, check the certificate against a pinned one if given, and run the handshake both ways.

    Proves that the node holds our access key and that we hold its, without
    registering anything. Raises ProbeFailed with the cause.
    """
    if not current_key():
        raise ProbeFailed("this gateway has no node access key configured (OPTIMAGPT_NODE_ACCESS_KEY)")
    ws = await _open(host, port)
    try:
        fingerprint = _peer_fingerprint(ws)
        if expected_fingerprint and fingerprint != expected_fingerprint:
            raise ProbeFailed("the node's certificate is not the one pinned when it was verified: another "
                              "machine, or the node's state folder was reset")
        gateway_nonce = new_nonce()
        await ws.send(json.dumps(hello_message(gateway_nonce)))
        auth = await _receive(ws)
        node_id = str(auth.get("node_id", ""))
        key, _, refusal = handshake_key(auth, gateway_nonce=gateway_nonce)
        if refusal in NOT_THE_PROTOCOL:
            raise ProbeFailed("the other side does not speak the node protocol: is it an OptimaGPT node?")
        if refusal is not None:
            await ws.send(json.dumps({"type": "refused", "reason": refusal}))
            await ws.close(CLOSE_AUTH_FAILED)
            raise ProbeFailed("access key mismatch: the node and the gateway have different node access keys")
        await ws.send(json.dumps(welcome_message(key=key, gateway_nonce=gateway_nonce, auth=auth,
                                                 heartbeat_interval_s=settings.OPTIMAGPT_HEARTBEAT_INTERVAL_S)))
        try:
            register = await _receive(ws)
        except ProbeFailed:
            raise ProbeFailed("the node refused this gateway's proof: access key mismatch") from None
        if register.get("type") != "register":
            raise ProbeFailed("the node did not register after the handshake")
        return ProbeResult(node_id=node_id, name=str(auth.get("name", ""))[:100],
                           version=str(auth.get("version", ""))[:32], fingerprint=fingerprint,
                           hardware=register.get("hardware") or {},
                           executors=len(register.get("executors") or ()))
    finally:
        await ws.close()


async def _receive(ws: Any) -> dict[str, Any]:
    from websockets.exceptions import ConnectionClosed

    try:
        message = json.loads(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT_S))
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else None
        if code == CLOSE_AUTH_FAILED:
            raise ProbeFailed("access key mismatch: the node refused this gateway's proof") from None
        raise ProbeFailed(f"the node closed the link during the handshake (code {code})") from None
    except (TimeoutError, ValueError):
        raise ProbeFailed("the other side does not speak the node protocol: is it an OptimaGPT node?") from None
    if not isinstance(message, dict):
        raise ProbeFailed("the other side does not speak the node protocol: is it an OptimaGPT node?")
    return message


async def run_consumer_over(ws: Any, *, node_id: str, address: str) -> None:
    """Run the node-link consumer on an outbound socket, as ASGI would for an inbound one."""
    from websockets.exceptions import ConnectionClosed

    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})

    async def pump() -> None:
        code = 1006
        try:
            async for message in ws:
                if isinstance(message, str):
                    inbox.put_nowait({"type": "websocket.receive", "text": message})
                else:
                    inbox.put_nowait({"type": "websocket.receive", "bytes": message})
        except ConnectionClosed:
            pass
        finally:
            if ws.close_code is not None:
                code = ws.close_code
            inbox.put_nowait({"type": "websocket.disconnect", "code": code})

    async def send(event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "websocket.send":
            with contextlib.suppress(ConnectionClosed):
                await ws.send(event["text"] if event.get("text") is not None else event["bytes"])
        elif kind == "websocket.close":
            await ws.close(event.get("code") or 1000)

    host, _, port = address.rpartition(":")
    scope: dict[str, Any] = {
        "type": "websocket", "path": LINK_PATH, "raw_path": LINK_PATH.encode(), "query_string": b"",
        "headers": [], "subprotocols": [], "client": (host, int(port or 0)), "server": None,
        "url_route": {"args": (), "kwargs": {}}, "optimagpt_expected_node_id": node_id}
    reader = asyncio.create_task(pump())
    try:
        await NodeLinkConsumer.as_asgi()(scope, inbox.get, send)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await ws.close()


class LinkDialer:
    """This gateway process's dialing: claim nodes, keep one link to each, re-dial with backoff and jitter."""

    def __init__(self) -> None:
        self._links: dict[int, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._last_auto_connect = 0.0

    async def run(self) -> None:
        log.info("dialing gateway-dialed nodes as %s", OWNER)
        while not self._stopping.is_set():
            try:
                await self._tick()
            except Exception:
                log.exception("node dialer tick failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), TICK_S)

    async def stop(self) -> None:
        """Close this process's dialed links and give their leases back, so another process can take over."""
        self._stopping.set()
        for task in self._links.values():
            task.cancel()
        await asyncio.gather(*self._links.values(), return_exceptions=True)
        self._links.clear()
        await database_sync_to_async(services.node_leases_release)(owner=OWNER)

    async def _tick(self) -> None:
        held = await database_sync_to_async(services.nodes_claim_for_dialing)(owner=OWNER, lease_s=LEASE_S)
        held_pks = {target.pk for target in held}
        for pk in [pk for pk in self._links if pk not in held_pks]:
            self._links.pop(pk).cancel()  # deactivated, deleted, or its lease lost: hang up
        for target in held:
            task = self._links.get(target.pk)
            if task is None or task.done():
                self._links[target.pk] = asyncio.create_task(self._keep_linked(target), name=f"dial {target.host}")
        due = time.monotonic() - self._last_auto_connect > AUTO_CONNECT_EVERY_S
        if settings.OPTIMAGPT_AUTO_CONNECT_ADDRESS and due:
            self._last_auto_connect = time.monotonic()
            await self._auto_connect()

    async def _auto_connect(self) -> None:
        """First start: with no node registered at all, a node listening on localhost:8022 becomes "Local Node"."""
        if await database_sync_to_async(services.nodes_exist)():
            return
        host, _, port = settings.OPTIMAGPT_AUTO_CONNECT_ADDRESS.rpartition(":")
        try:
            probe = await node_probe(host=host, port=int(port))
        except (ProbeFailed, ValueError) as exc:
            log.debug("no local node to connect: %s", exc)
            return
        if await database_sync_to_async(services.node_add_dialed)(
                name="Local Node", host=host, port=int(port), node_id=probe.node_id,
                fingerprint=probe.fingerprint, version=probe.version):
            log.info("registered the node listening on %s:%s as Local Node", host, port)

    async def _keep_linked(self, target: services.DialTarget) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                ws = await _open(target.host, target.port)
                if target.fingerprint and _peer_fingerprint(ws) != target.fingerprint:
                    await ws.close()
                    raise ProbeFailed("the node's certificate is not the one pinned when it was verified")
                await run_consumer_over(ws, node_id=target.node_id, address=f"{target.host}:{target.port}")
            except asyncio.CancelledError:
                raise
            except ProbeFailed as exc:
                await database_sync_to_async(services.node_dial_failed)(node_pk=target.pk, reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - any failure of a link means: dial again
                log.warning("link to %s:%d lost: %s: %s", target.host, target.port, type(exc).__name__, exc)
            failures, delay = redial_delay(failures, time.monotonic() - started)
            await asyncio.sleep(delay)


_dialer: LinkDialer | None = None


def dialer_start() -> LinkDialer:
    """Start this process's dialer on the running event loop (the gateway server does it once)."""
    global _dialer
    if _dialer is None:
        _dialer = LinkDialer()
        asyncio.get_running_loop().create_task(_dialer.run(), name="node dialer")
    return _dialer
