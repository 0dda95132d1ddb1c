"""Request dispatch: sending one request to a node (or a remote upstream) and receiving its events.

The path: this process picks an executor, sends `node.request` to the channel
of the consumer that holds the node's link (in this process or, on the Redis
layer, in another gateway process), and reads the node's events from a reply
channel of its own. Leaving early (client gone, timeout) sends `node.cancel`.
A link this process holds is spoken to directly instead: the consumer's
handler is called, and the events come back on a queue (no channel layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, Protocol

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings

from node_agent.protocol import OP_CONFIGURE
from nodes.consumers import (
    LOCAL_REPLY_PREFIX,
    NodeLinkConsumer,
    link_held_here,
    local_link,
    local_reply_close,
    local_reply_open,
)
from nodes.models import Node
from operations.record import note_attempt_start, note_model, routed
from optimagpt.errors import ApiError, NoCapacity, UpstreamTimeout

from .calls import Call, event_error, revoked_event
from .connectors.remote import remote_call_start
from .limits import principal_admit
from .principal import Principal
from .revocation import track, untrack
from .routing.router import Target, release, route

log = logging.getLogger("optimagpt.gateway")

SEND_TIMEOUT_S = 5.0
CANCEL_SEND_TIMEOUT_S = 5.0


async def _drop_channel(channel: str) -> None:
    """Let the layer forget a reply channel that will never be read again.

    Channels has no call for this. The Redis pub/sub layer keeps every channel made
    by new_channel() subscribed, one subscription per request for ever, until a
    receive on it is cancelled, which is its documented clean-up; so we cancel one.
    The in-memory layer drops a channel by itself once it is read empty.
    """
    layer = get_channel_layer()
    if not isinstance(layer, RedisPubSubChannelLayer):
        return
    waiter = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0)  # let it start waiting, so that cancelling it unsubscribes
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await waiter


class InferenceCall(Call):
    """A request to an executor on a node, over the channel layer and the node's link."""

    def __init__(self, target: Target, request_id: str, reply_channel: str, principal: Principal,
                 **timing: float) -> None:
        super().__init__(target, request_id, principal, **timing)
        self.reply_channel = reply_channel
        # A link held by this process: its events come on this queue, not through the channel layer.
        self._local = local_reply_open(reply_channel) if reply_channel.startswith(LOCAL_REPLY_PREFIX) else None
        # On the Redis pub/sub layer a cancelled receive unsubscribes the channel and drops what it
        # had buffered: an event arriving as a wait timed out was lost. There a receive stays pending
        # across waits; the in-memory layer's receive is safe to cancel, and cheaper so.
        self._keep_receiving = isinstance(get_channel_layer(), RedisPubSubChannelLayer)
        self._receiving: asyncio.Future[dict[str, Any]] | None = None

    async def revoke(self) -> None:
        raw = json.dumps(self._revoked_event())
        if self._local is not None:
            self._local.put_nowait(raw)  # a full queue means a client not reading: it is given up anyway
            return
        await get_channel_layer().send(self.reply_channel, {"type": "node.event", "raw": raw})

    async def _receive(self, timeout_s: float) -> dict[str, Any]:
        if self._local is not None:
            async with asyncio.timeout(timeout_s):
                return json.loads(await self._local.get())
        if not self._keep_receiving:
            async with asyncio.timeout(timeout_s):  # cheaper than wait_for: no task per event
                message = await get_channel_layer().receive(self.reply_channel)
            return json.loads(message["raw"])
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(get_channel_layer().receive(self.reply_channel))
        done, _ = await asyncio.wait({self._receiving}, timeout=timeout_s)
        if not done:
            raise TimeoutError
        receiving, self._receiving = self._receiving, None
        return json.loads(receiving.result()["raw"])

    async def _target_linked(self) -> bool:
        if link_held_here(self.target.channel_name) or self.target.node_pk is None:
            return True
        return await database_sync_to_async(Node.objects.filter(
            pk=self.target.node_pk, connected=True, channel_name=self.target.channel_name).exists)()

    async def _cancel(self) -> None:
        if self._local is not None:
            local_reply_close(self.reply_channel)
            consumer = local_link(self.target.channel_name)
            if not self.finished and consumer is not None:  # (a link gone has nothing to stop)
                await consumer.node_cancel({"id": self.request_id})
            return
        if self._receiving is not None:
            receiving, self._receiving = self._receiving, None
            receiving.cancel()  # which unsubscribes: the channel is dropped
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiving
        await _drop_channel(self.reply_channel)
        if not self.finished:
            # The client left or we gave up: the node must stop generating for nobody.
            try:
                await asyncio.wait_for(
                    get_channel_layer().send(self.target.channel_name, {"type": "node.cancel", "id": self.request_id}),
                    CANCEL_SEND_TIMEOUT_S,
                )
            except Exception:  # noqa: BLE001 - a lost cancel only wastes the node's time
                log.warning("could not cancel request %s on its node", self.request_id)


def _fails_over(exc: ApiError) -> bool:
    """Whether an error before any reply means "this node could not do it" (another may), not "the request is bad"."""
    # inference_failed and request_crashed are this request's doing: another node would fail it the same way.
    return exc.status >= 500 and exc.code not in ("timeout", "deadline_exceeded", "queue_timeout", "inference_failed",
                                                  "request_crashed")


class RoutedRequest:
    """A client's request: routed (waiting in the model's queue if every slot is busy) and sent to an executor.

    Iterate `events()` as a Call's. When the executor fails the request before any of
    its reply has gone to the client (a node that dropped its link, a process that
    died, an executor no longer ready), the request is sent to another node, up to
    OPTIMAGPT_FAILOVER_ATTEMPTS times and within its deadline. A streamed reply that
    has sent text ends with the error instead: resending would duplicate that text.
    """

    def __init__(self, *, principal: Principal, model: str, op: str, body_json: str, stream: bool) -> None:
        self.principal = principal
        self.model = model
        self.op = op
        self.body_json = body_json
        self.stream = stream
        self.since = time.monotonic()
        self.deadline = asyncio.get_running_loop().time() + settings.OPTIMAGPT_REQUEST_DEADLINE_S
        self.call: Call | None = None
        self.revoked = False
        self.attempts = 0
        self._abandon: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # set: leave the queue
        self._exclude_nodes: set[int] = set()
        self._avoid_executors: set[int] = set()
        key = principal.api_key
        self.queue_key = f"key:{key.pk}" if key is not None else f"user:{principal.user_id}"
        self._routed = False
        note_model(model, stream)

    async def start(self) -> None:
        """Route and send the first attempt; raises ModelNotFound, NoCapacity or QueueFull."""
        track(self)
        try:
            self.call = await self._attempt()
        except BaseException:
            await self.close()
            raise
        self._routed = True
        routed(self.model, 1)

    async def revoke(self) -> None:
        """End the request because its API key was revoked, whether queued or streaming."""
        if self.call is not None:
            await self.call.revoke()
        elif not self._abandon.done():
            self._abandon.set_result(None)

    async def _attempt(self) -> Call:
        self.attempts += 1
        noted = note_attempt_start()
        try:
            target = await route(model=self.model, key=self.queue_key, deadline=self.deadline,
                                 exclude_nodes=frozenset(self._exclude_nodes),
                                 avoid_executors=frozenset(self._avoid_executors), abandon=self._abandon)
        except NoCapacity as exc:
            if exc.code == "abandoned":
                raise event_error(revoked_event()) from None
            raise
        if self._abandon.done():  # revoked as its slot came
            release(target)
            raise event_error(revoked_event())
        if noted is not None:
            noted.granted = time.time_ns()
            noted.node_pk, noted.node_name, noted.executor = target.node_pk, target.node_name, target.executor_key
            noted.sha256 = target.sha256
        timing = {"since": self.since, "deadline": self.deadline}
        if target.remote:
            if noted is not None:
                noted.sent = time.time_ns()
            try:
                return await remote_call_start(target=target, principal=self.principal, op=self.op,
                                               body_json=self.body_json, stream=self.stream, **timing)
            except BaseException:
                release(target)
                raise
        consumer = local_link(target.channel_name)
        if consumer is not None:
            return await self._send_here(consumer, target, noted, timing)
        layer = get_channel_layer()
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                reply_channel = await layer.new_channel("reply.")
        except BaseException as exc:
            release(target)
            if isinstance(exc, Exception):  # Redis unreachable, say
                raise NoCapacity("The gateway cannot reach its channel layer right now.", param="model",
                                 code="channel_layer_unavailable", retry_after=5) from exc
            raise
        call = InferenceCall(target, os.urandom(16).hex(), reply_channel, self.principal, **timing)
        return await self._sent(call, layer.send(target.channel_name, self._request_event(call)), SEND_TIMEOUT_S,
                                noted)

    def _request_event(self, call: InferenceCall) -> dict[str, Any]:
        """The `node.request` event, as the link's consumer takes it."""
        return {
            "type": "node.request",
            "id": call.request_id,
            "reply_channel": call.reply_channel,
            "executor": call.target.executor_key,
            "op": self.op,
            "stream": self.stream,
            "body_json": self.body_json,
            # The node stops by itself at the deadline, should our cancel be lost on the way.
            "deadline_s": round(max(self.deadline - asyncio.get_running_loop().time(), 0.001), 3),
        }

    async def _send_here(self, consumer: NodeLinkConsumer, target: Target, noted: Any,
                         timing: dict[str, float]) -> InferenceCall:
        """Hand the request to a link this process holds: its consumer's handler, called here."""
        request_id = os.urandom(16).hex()
        call = InferenceCall(target, request_id, LOCAL_REPLY_PREFIX + request_id, self.principal, **timing)
        return await self._sent(call, consumer.node_request(self._request_event(call)), None, noted)

    async def _sent(self, call: InferenceCall, send: Coroutine[Any, Any, None], timeout_s: float | None,
                    noted: Any) -> InferenceCall:
        """Await `send`, which hands `call`'s request on; if it fails, the call is closed and the node counts as
        not taking requests now (NoCapacity, which fails over): its channel full, the layer unreachable, the
        link broken as we wrote to it."""
        try:
            async with asyncio.timeout(timeout_s):
                await send
        except Exception as exc:
            call.finished = True
            await call.close()
            raise NoCapacity(f"The node serving '{self.model}' is not taking requests right now.",
                             param="model") from exc
        except BaseException:
            call.finished = True
            await call.close()
            raise
        if noted is not None:
            noted.sent = time.time_ns()
        return call

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        assert self.call is not None, "start() first"
        loop = asyncio.get_running_loop()
        sent = False
        try:
            while True:
                try:
                    async for event in self.call.events():
                        sent = sent or self.stream
                        yield event
                    return
                except ApiError as exc:
                    if sent or not _fails_over(exc) or self.attempts > settings.OPTIMAGPT_FAILOVER_ATTEMPTS \
                            or loop.time() >= self.deadline:
                        raise
                    failed = self.call.target
                    self.call.counted = False
                    await self.call.close()
                    if exc.code == "node_disconnected" and failed.node_pk is not None:
                        self._exclude_nodes.add(failed.node_pk)  # gone: its other executors too
                    self._avoid_executors.add(failed.executor_pk)  # elsewhere if possible; a restarted process else
                    log.info("request %s failed on executor %s before any reply (%s); sending it elsewhere",
                             self.call.request_id, failed.executor_pk, exc.code)
                    try:
                        self.call = await self._attempt()
                    except ApiError:
                        raise exc from None  # nobody else can take it: the client learns what went wrong first
        finally:
            await self.close()

    async def close(self) -> None:
        untrack(self)
        if self._routed:
            self._routed = False
            routed(self.model, -1)
        if self.call is not None:
            await self.call.close()


class Streamed(Protocol):
    """What the API reads a reply from: a RoutedRequest, or gateway/mcp_rounds.py's McpRounds."""

    principal: Principal

    def events(self) -> AsyncGenerator[dict[str, Any], None]: ...

    async def close(self) -> None: ...


async def first_event(call: Streamed) -> tuple[AsyncGenerator[dict[str, Any], None], dict[str, Any]]:
    """Wait for the node's first event, so errors before any token still get a proper status code."""
    events = call.events()
    try:
        first = await anext(events)
    except BaseException:
        await call.close()
        raise
    return events, first


async def inference_start(*, principal: Principal, model: str, op: str, body_json: str,
                          stream: bool) -> RoutedRequest:
    """Admit, route and send a request to an executor of `model`; raises ModelNotFound, NoCapacity or QueueFull.

    `body_json` is the request body, already validated, as JSON text: it travels to
    the inference process as it is.
    """
    await principal_admit(principal=principal, model=model)
    request = RoutedRequest(principal=principal, model=model, op=op, body_json=body_json, stream=stream)
    await request.start()
    return request


CONFIGURE_TIMEOUT_S = 60.0


async def node_configure(*, channel_name: str, executor_key: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Ask the node holding `channel_name` to change an executor's settings; its new description, or ApiError.

    The node applies the change (restarting the model's processes if needed) before it answers.
    """
    layer = get_channel_layer()
    reply_channel = await layer.new_channel("reply.")
    try:
        await asyncio.wait_for(layer.send(channel_name, {
            "type": "node.request", "id": uuid.uuid4().hex, "reply_channel": reply_channel,
            "executor": executor_key, "op": OP_CONFIGURE, "stream": False, "body_json": json.dumps(changes),
        }), SEND_TIMEOUT_S)
        message = await asyncio.wait_for(layer.receive(reply_channel), CONFIGURE_TIMEOUT_S)
    except TimeoutError:
        raise UpstreamTimeout("The node did not confirm the change in time.") from None
    finally:
        await _drop_channel(reply_channel)
    event = json.loads(message["raw"])
    if event.get("type") != "end":
        raise event_error(event)
    return event["executor"]
