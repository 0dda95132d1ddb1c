"""The gateway's side of the node link: one consumer per connected node.

Requests reach it as channel-layer events (`node.request`, `node.cancel`) from
whichever gateway process took the HTTP call; the node's events go back to
each request's reply channel. The wire protocol is in node_agent/protocol.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from node_agent.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_HEARTBEAT_LOST,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REPLACED,
    HANDSHAKE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    auth_refusal,
    error_event,
    hello_message,
    identity_proof,
    new_nonce,
    split_message,
    watch_silence,
    welcome_message,
)
from operations.nodekeys import handshake_key, key_accepted

from . import services
from .enrollment import node_credential

log = logging.getLogger("optimagpt.nodes.link")

_REQUEST_EVENTS = frozenset({"delta", "end", "error"})
CONSOLE_GROUP = "node-console"
CHANNEL_SEND_TIMEOUT_S = 5.0

# The authenticated links this process holds, by channel name. A request routed to a link that closed
# a moment before it was sent would wait for nothing until its timeout; its waiter asks here. A request
# for a link held here is handed to its consumer directly (local_link), not through the channel layer.
_live_links: dict[str, NodeLinkConsumer] = {}
# Reply queues of requests sent to links held here: the consumer puts their events on them directly.
_local_replies: dict[str, asyncio.Queue[str]] = {}
LOCAL_REPLY_PREFIX = "local!"  # never a channel layer's name (those have no "!" but the one before a process's)
REPLY_CAPACITY = 1000  # events a request may have waiting unread, as the channel layer's capacity


def link_held_here(channel_name: str) -> bool:
    """Whether this process holds the link behind `channel_name`, up and authenticated. False says nothing
    of links other gateway processes hold: the node's row says whether those are up."""
    return channel_name in _live_links


def local_link(channel_name: str) -> NodeLinkConsumer | None:
    """The consumer of a link this process holds, for a request to call directly; None if another holds it."""
    consumer = _live_links.get(channel_name)
    return consumer if consumer is not None and not consumer.closing else None


def local_reply_open(name: str) -> asyncio.Queue[str]:
    """A reply queue for a request sent to a link held here, under `name` (LOCAL_REPLY_PREFIX + an id)."""
    queue: asyncio.Queue[str] = asyncio.Queue(REPLY_CAPACITY)
    _local_replies[name] = queue
    return queue


def local_reply_close(name: str) -> None:
    _local_replies.pop(name, None)


class NodeLinkConsumer(AsyncWebsocketConsumer):
    node_pk: int | None = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Call the handler, without Channels' connection clean-up before each message.

        Channels hops to a thread to close stale database connections before every
        message; on this link that is every request and every streamed chunk, and
        it was a large share of the gateway's CPU per request (bench/README.md,
        "Measurements behind the code"). Our few queries run
        through database_sync_to_async, which does that clean-up itself.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self.address = _peer(self.scope)
        self.gateway_nonce = new_nonce()
        self.in_flight: dict[str, str] = {}  # request id -> reply channel
        self.parts: dict[str, list[str]] = {}  # request id -> the parts of a long message so far
        self.last_heard = time.monotonic()
        self.last_seen_saved = 0.0
        self.heartbeat_interval_s = settings.OPTIMAGPT_HEARTBEAT_INTERVAL_S
        self.closing = False
        self.link_key = ""  # the node access key this link was made with: closed once it is no longer accepted
        self.link_enrolled = False  # made with an enrolled node's own credential instead (deleting the node ends it)
        self.authenticated = asyncio.Event()
        await self.accept()
        await self._send(hello_message(self.gateway_nonce))
        self.watchdog = asyncio.create_task(self._watchdog())

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if hasattr(self, "watchdog"):
            self.watchdog.cancel()
        await self._lost(f"link closed (code {code})")

    async def _lost(self, reason: str) -> None:
        """The node is gone: fail what waits on it (for failover elsewhere) and mark it disconnected, once."""
        self.closing = True
        # Every request still waiting on this node learns at once that it will get nothing more.
        in_flight, self.in_flight = self.in_flight, {}
        self.parts.clear()
        for rid, reply in in_flight.items():
            await self._forward(rid, reply, _disconnected(rid))
        node_pk, self.node_pk = self.node_pk, None
        _live_links.pop(self.channel_name, None)
        if node_pk is not None:
            await database_sync_to_async(services.node_link_closed)(
                node_pk=node_pk, channel_name=self.channel_name, reason=reason)
            await self._to_console({"kind": "link", "connected": False}, node_pk=node_pk)

    async def _send(self, message: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(message, separators=(",", ":")))

    async def _refuse(self, reason: str, node_id: str = "") -> None:
        await database_sync_to_async(services.node_handshake_refused)(
            node_id=node_id, address=self.address, reason=reason,
            dialed=bool(node_id) and node_id == self.scope.get("optimagpt_expected_node_id"))
        await self._send({"type": "refused", "reason": reason})
        await self.close(CLOSE_AUTH_FAILED)

    # -- from the node ------------------------------------------------------
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing:
            return  # given up on (heartbeats lost): whatever still arrives belongs to no one
        self.last_heard = time.monotonic()
        try:
            message = json.loads(text_data or "")
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            await self.close(CLOSE_PROTOCOL_ERROR)
            return
        if kind == "part" and self.node_pk is not None:
            await self._part(message)
        elif kind in _REQUEST_EVENTS and self.node_pk is not None:
            rid = message.get("id")
            reply = self.in_flight.pop(rid, None) if kind != "delta" else self.in_flight.get(rid)
            if reply is not None:
                await self._forward(rid, reply, text_data or "")
        elif self.node_pk is None:
            await self._authenticate(message)
        elif kind == "ping":
            await self._send({"type": "pong", "t": message.get("t")})
            await self._mark_seen()
        elif kind == "pong":
            await self._mark_seen()
        elif kind == "metrics":
            metric = await database_sync_to_async(services.node_metrics_record)(
                node_pk=self.node_pk, sample=message.get("metrics") or {})
            if metric is not None:
                await self._to_console({"kind": "metrics", "point": metric.as_point()})
        elif kind == "logs":
            lines = await database_sync_to_async(services.node_logs_record)(
                node_pk=self.node_pk, records=message.get("records"))
            if lines:
                await self._to_console({"kind": "logs", "lines": [line.as_line() for line in lines]})
        elif kind in ("register", "executors"):
            await self._sync_executors(message)
            await self._to_console({"kind": "executors"})

    async def _part(self, message: dict[str, Any]) -> None:
        """Collect a long node message sent in parts; handle it whole once its last part came.

        A message that grows past the link's limit fails its own request (the node is told to stop);
        the link and every other request on it go on.
        """
        rid, data = message.get("id"), message.get("data")
        # A request's reply, or (id "") a long report of the node's own (executors, logs).
        if not isinstance(rid, str) or not isinstance(data, str) or (rid and rid not in self.in_flight):
            self.parts.pop(str(rid), None)
            return
        parts = self.parts.setdefault(rid, [])
        parts.append(data)
        if sum(map(len, parts)) > MAX_MESSAGE_BYTES:
            del self.parts[rid]
            if not rid:
                log.warning("node %s sent a report larger than %d bytes; dropped", self.node_pk, MAX_MESSAGE_BYTES)
                return
            reply = self.in_flight.pop(rid)
            await self._send({"type": "cancel", "id": rid})
            await self._forward(rid, reply, json.dumps(error_event(
                rid, f"The reply is larger than {MAX_MESSAGE_BYTES} bytes.", code="reply_too_large", status=502)))
            return
        if not message.get("more"):
            await self.receive(text_data="".join(self.parts.pop(rid)))

    async def _to_console(self, event: dict[str, Any], node_pk: int | None = None) -> None:
        """Tell the browsers watching the node console (nodes/console.py); nobody watching costs one lookup."""
        try:
            await asyncio.wait_for(self.channel_layer.group_send(
                CONSOLE_GROUP, {"type": "console.event", "event": {**event, "node": node_pk or self.node_pk}}),
                CHANNEL_SEND_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the console is a view; the link must not suffer for it
            log.debug("console update dropped: %s", type(exc).__name__)

    async def _forward(self, rid: str, reply: str, raw: str) -> None:
        """Pass a node event to the request waiting for it; a request that cannot take it is cancelled.

        A client that stops reading fills its reply channel (capacity 1000 chunks).
        That request is given up; the link and every other request on it go on.
        """
        try:
            if reply.startswith(LOCAL_REPLY_PREFIX):  # a request of this process: straight onto its queue
                queue = _local_replies.get(reply)
                if queue is not None:  # else it has ended: nobody waits for this
                    queue.put_nowait(raw)
                return
            async with asyncio.timeout(CHANNEL_SEND_TIMEOUT_S):  # cheaper than wait_for: no task per event
                await self.channel_layer.send(reply, {"type": "node.event", "raw": raw})
        except Exception as exc:  # noqa: BLE001 - ChannelFull, QueueFull, a timeout, or Redis gone: same remedy
            log.warning("dropping request %s: its reply channel took no event (%s)", rid, type(exc).__name__)
            if self.in_flight.pop(rid, None) is not None:
                await self._send({"type": "cancel", "id": rid})

    async def _authenticate(self, message: dict[str, Any]) -> None:
        node_id = str(message.get("node_id", ""))
        if message.get("enrolled") is True:  # its own credential (nodes/enrollment.py), not the shared key
            credential = await database_sync_to_async(node_credential)(node_id)
            if credential is None:
                await self._refuse("this node is not enrolled here (deleted, or never enrolled): join again "
                                   "with a new enrollment token", node_id)
                return
            key, refusal, self.link_enrolled = credential, auth_refusal(
                message, key=credential, gateway_nonce=self.gateway_nonce), True
        else:
            # The current node access key, or the one before it during its grace period (operations/nodekeys.py).
            key, _, refusal = handshake_key(message, gateway_nonce=self.gateway_nonce)
        if refusal is not None:
            await self._refuse(refusal, node_id)
            return
        node_nonce = str(message["nonce"])
        # A link the gateway dialed must reach the node verified at that address, not another one.
        dialed = self.scope.get("optimagpt_expected_node_id")
        if dialed and dialed != node_id:
            await self._refuse(f"expected node {dialed} at this address, found {node_id}", dialed)
            return
        try:
            opened = await database_sync_to_async(services.node_link_open)(
                node_id=node_id, name=str(message.get("name", "")), version=str(message.get("version", "")),
                address=self.address, channel_name=self.channel_name,
                identity_proof_of=lambda secret: identity_proof(secret, self.gateway_nonce, node_nonce, node_id),
                identity=message.get("identity"))
        except services.NodeRefused as exc:
            await self._refuse(str(exc), node_id)
            return
        if opened.replaced:
            await self.channel_layer.send(opened.replaced, {"type": "node.replaced"})
        self.node_pk = opened.node.pk
        self.link_key = key
        _live_links[self.channel_name] = self
        await self._to_console({"kind": "link", "connected": True})
        await self._send(welcome_message(key=key, gateway_nonce=self.gateway_nonce, auth=message,
                                         heartbeat_interval_s=self.heartbeat_interval_s, new_secret=opened.new_secret))
        self.authenticated.set()  # after the welcome: the watchdog's first ping must not come before it

    async def _mark_seen(self) -> None:
        if not self.link_enrolled and not key_accepted(self.link_key):
            log.warning("node %s linked with a node access key that was rotated and whose grace period has "
                        "ended; closing its link", self.node_pk)
            await self._lost("the node access key it linked with was rotated and its grace period ended")
            await self.close(CLOSE_AUTH_FAILED)
            return
        now = time.monotonic()
        if now - self.last_seen_saved >= self.heartbeat_interval_s * 0.9:
            self.last_seen_saved = now
            await database_sync_to_async(services.node_seen)(node_pk=self.node_pk)

    async def _sync_executors(self, message: dict[str, Any]) -> None:
        executors = message.get("executors")
        if not isinstance(executors, list):
            return
        if message["type"] == "register":
            await database_sync_to_async(services.node_register)(
                node_pk=self.node_pk, hardware=message.get("hardware") or {}, executors=executors)
        else:
            await database_sync_to_async(services.executors_sync)(node_pk=self.node_pk, reported=executors)

    async def _watchdog(self) -> None:
        """Close a link that did not authenticate in time, or whose node fell silent for 3 heartbeats.

        A node sends something at least every interval (its own pings, our pings' pongs). Silence is
        checked four times an interval and judged at 2.75 intervals, so a node that stopped answering
        (killed without a FIN, frozen, cut off: a half-open socket) is let go within 3 intervals.
        """
        try:
            await asyncio.wait_for(self.authenticated.wait(), HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            await self._refuse("handshake timed out")
            return
        async def lost(silent_s: float) -> None:
            log.warning("node %s silent for %.1f s; closing its link", self.node_pk, silent_s)
            # A half-open socket never answers the close handshake: act now, not after its timeout.
            await self._lost("heartbeat lost")
            await self.close(CLOSE_HEARTBEAT_LOST)

        await watch_silence(interval_s=self.heartbeat_interval_s, last_heard=lambda: self.last_heard,
                            ping=lambda: self._send({"type": "ping", "t": time.time()}), lost=lost,
                            running=lambda: not self.closing)

    # -- from the gateway's request handlers (channel layer) ----------------
    async def node_request(self, event: dict[str, Any]) -> None:
        rid = event["id"]
        if self.closing:  # routed here from a view of the nodes a moment old: fail it at once, for failover
            await self._forward(rid, event["reply_channel"], _disconnected(rid))
            return
        head = {"type": "request", "id": rid, "executor": event["executor"], "op": event["op"],
                "stream": event["stream"]}
        if event.get("deadline_s"):
            head["deadline_s"] = event["deadline_s"]
        # The body is spliced in as the client sent it: one JSON value, checked by the API, so it cannot
        # end the message early; on the node's pipe it travels in a frame of its own length.
        text = json.dumps(head, separators=(",", ":"))[:-1] + ',"body":' + event["body_json"] + "}"
        if len(text) * 4 > MAX_MESSAGE_BYTES and len(text.encode()) > MAX_MESSAGE_BYTES:
            await self._forward(rid, event["reply_channel"], json.dumps(error_event(
                rid, f"The request is larger than the node link carries ({MAX_MESSAGE_BYTES} bytes).",
                code="request_too_large", status=413)))
            return
        self.in_flight[rid] = event["reply_channel"]
        for piece in split_message(rid, text):  # long bodies in parts: each fits the socket's message limit
            await self.send(text_data=piece)

    async def node_cancel(self, event: dict[str, Any]) -> None:
        self.parts.pop(event["id"], None)
        if self.in_flight.pop(event["id"], None) is not None:
            await self._send({"type": "cancel", "id": event["id"]})

    async def node_close(self, event: dict[str, Any]) -> None:
        """An admin deactivated or deleted the node: end its link (a new handshake is refused while deactivated)."""
        log.info("closing the link of node %s at an admin's request", self.node_pk)
        await self.close(CLOSE_REPLACED)

    async def node_replaced(self, event: dict[str, Any]) -> None:
        log.info("node %s linked again elsewhere; closing this older link", self.node_pk)
        self.node_pk = None  # the newer link owns the node row now
        _live_links.pop(self.channel_name, None)
        await self.close(CLOSE_REPLACED)


def _disconnected(rid: str) -> str:
    """The error event for a request whose node went away (the gateway may send it to another node)."""
    return json.dumps(error_event(rid, "The node disconnected.", code="node_disconnected", status=502))


def _peer(scope: dict[str, Any]) -> str:
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"
