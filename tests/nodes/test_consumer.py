"""The node-link consumer: handshake both ways, refusal on a key mismatch, events routed to requests."""

from __future__ import annotations

import json
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from node_agent.protocol import (
    CLOSE_AUTH_FAILED,
    gateway_proof,
    identity_proof,
    new_nonce,
    node_proof,
    open_node_secret,
)
from nodes.consumers import NodeLinkConsumer
from nodes.models import Executor, Node

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "tests-node-access-key"  # tests/settings.py
EXECUTOR = {"key": "SmolLM2.gguf", "model_id": "smollm2", "name": "SmolLM2", "architecture": "llama",
            "parameter_count": 134515008, "quantization": "Q4_1", "context_length": 8192, "n_ctx": 4096,
            "size_bytes": 98362432, "state": "online", "error": ""}


def _communicator() -> WebsocketCommunicator:
    return WebsocketCommunicator(NodeLinkConsumer.as_asgi(), "/ws/node/")


async def _handshake(comm: WebsocketCommunicator, key: str, node_id: str, secret: str | None = None) -> dict:
    """Link as `node_id`; with `secret`, prove the identity too. The reply gets `_secret`: the node secret
    the welcome carried, opened as the node would."""
    connected, _ = await comm.connect()
    assert connected
    hello = await comm.receive_json_from()
    assert hello["type"] == "hello" and len(hello["nonce"]) >= 32
    nonce = new_nonce()
    auth = {"type": "auth", "node_id": node_id, "name": "n1", "version": "0.1.0", "nonce": nonce,
            "proof": node_proof(key, hello["nonce"], nonce, node_id)}
    if secret is not None:
        auth["identity"] = identity_proof(secret, hello["nonce"], nonce, node_id)
    await comm.send_json_to(auth)
    reply = await comm.receive_json_from()
    reply["_expected_proof"] = gateway_proof(KEY, hello["nonce"], nonce, node_id)
    if "node_secret" in reply:
        reply["_secret"] = open_node_secret(reply.pop("node_secret"), KEY, hello["nonce"], nonce, node_id)
    return reply


async def test_a_node_with_the_right_key_links_and_the_gateway_proves_itself() -> None:
    comm = _communicator()
    node_id = str(uuid.uuid4())
    reply = await _handshake(comm, KEY, node_id)
    assert reply["type"] == "welcome"
    assert reply["proof"] == reply["_expected_proof"]
    await comm.send_json_to({"type": "register", "hardware": {"cpu_count": 2}, "executors": [EXECUTOR]})
    await comm.send_json_to({"type": "ping", "t": 1})
    assert (await comm.receive_json_from())["type"] in ("pong", "ping")
    node = await Node.objects.aget(node_id=node_id)
    assert node.connected and node.hardware == {"cpu_count": 2}
    executor = await Executor.objects.aget(node=node)
    assert executor.model_id == "smollm2" and executor.state == "online"
    await comm.disconnect()
    node = await Node.objects.aget(node_id=node_id)
    assert not node.connected and node.channel_name == ""


async def test_a_key_mismatch_is_refused_and_logged_and_writes_nothing_to_the_node_it_names(caplog) -> None:
    node_id = str(uuid.uuid4())
    await Node.objects.acreate(node_id=node_id, name="known")
    comm = _communicator()
    reply = await _handshake(comm, "not-the-key", node_id)
    assert reply == {"type": "refused", "reason": "access key mismatch", "_expected_proof": reply["_expected_proof"]}
    output = await comm.receive_output()
    assert output == {"type": "websocket.close", "code": CLOSE_AUTH_FAILED}
    node = await Node.objects.aget(node_id=node_id)
    # The id an unauthenticated link claims proves nothing: the real node's row is not the caller's to write.
    assert not node.connected and node.last_error == ""
    assert "access key mismatch" in caplog.text
    assert "not-the-key" not in caplog.text


async def test_anything_before_auth_is_refused() -> None:
    comm = _communicator()
    await comm.connect()
    await comm.receive_json_from()
    await comm.send_json_to({"type": "register", "executors": []})
    assert (await comm.receive_json_from())["type"] == "refused"
    assert (await comm.receive_output())["code"] == CLOSE_AUTH_FAILED
    assert not await Node.objects.aexists()


async def _receive_skipping_pings(comm: WebsocketCommunicator) -> dict:
    message = await comm.receive_json_from()
    while message["type"] == "ping":
        message = await comm.receive_json_from()
    return message


async def _linked_node_with_request(rid: str) -> tuple[WebsocketCommunicator, Node, str]:
    """A linked node that has been sent request `rid`; returns the link, the node and the reply channel."""
    comm = _communicator()
    node_id = str(uuid.uuid4())
    assert (await _handshake(comm, KEY, node_id))["type"] == "welcome"
    node = await Node.objects.aget(node_id=node_id)
    reply = await get_channel_layer().new_channel("reply.")
    await get_channel_layer().send(node.channel_name, {
        "type": "node.request", "id": rid, "reply_channel": reply, "executor": "SmolLM2.gguf", "op": "chat",
        "stream": True, "body_json": "{}"})
    return comm, node, reply


async def test_node_events_reach_the_request_that_asked_and_cancel_reaches_the_node() -> None:
    comm, node, reply = await _linked_node_with_request("r1")
    layer = get_channel_layer()
    assert await _receive_skipping_pings(comm) == {
        "type": "request", "id": "r1", "executor": "SmolLM2.gguf", "op": "chat", "stream": True, "body": {}}
    await comm.send_json_to({"type": "delta", "id": "r1", "delta": {"content": "Hi"}})
    assert json.loads((await layer.receive(reply))["raw"])["delta"] == {"content": "Hi"}
    await layer.send(node.channel_name, {"type": "node.cancel", "id": "r1"})
    assert await _receive_skipping_pings(comm) == {"type": "cancel", "id": "r1"}
    await comm.disconnect()


async def test_a_dropped_link_fails_the_requests_in_flight_at_once() -> None:
    comm, _, reply = await _linked_node_with_request("r2")
    layer = get_channel_layer()
    await _receive_skipping_pings(comm)
    await comm.disconnect()
    event = json.loads((await layer.receive(reply))["raw"])
    assert event["type"] == "error" and event["error"]["code"] == "node_disconnected"


async def test_a_node_proves_it_is_the_one_that_first_linked_and_an_impostor_with_the_key_is_refused() -> None:
    node_id = str(uuid.uuid4())
    real = _communicator()
    first = await _handshake(real, KEY, node_id)
    assert first["type"] == "welcome" and len(first["_secret"]) == 64, "the first link gets the node's secret"
    await real.disconnect()
    again = _communicator()
    second = await _handshake(again, KEY, node_id, secret=first["_secret"])
    assert second["type"] == "welcome" and "_secret" not in second
    linked = await Node.objects.aget(node_id=node_id)
    for identity in (None, "0" * 64):  # only the shared key; a made-up secret
        impostor = _communicator()
        refused = await _handshake(impostor, KEY, node_id, secret=identity)
        assert refused["type"] == "refused" and "identity" in refused["reason"]
        assert (await impostor.receive_output())["code"] == CLOSE_AUTH_FAILED
    node = await Node.objects.aget(node_id=node_id)
    assert node.connected and node.channel_name == linked.channel_name and node.last_error == ""
    await again.disconnect()


async def test_a_new_node_waits_for_approval_and_is_routed_nothing_until_then() -> None:
    from django.test import override_settings

    comm = _communicator()
    node_id = str(uuid.uuid4())
    assert (await _handshake(comm, KEY, node_id))["type"] == "welcome"
    await comm.send_json_to({"type": "register", "hardware": {}, "executors": [EXECUTOR]})
    await comm.send_json_to({"type": "ping", "t": 1})
    await _receive_skipping_pings(comm)
    node = await Node.objects.aget(node_id=node_id)
    assert not node.approved and node.connected
    assert not await Executor.objects.ready(model="smollm2").aexists()
    from nodes.services import node_approve

    await sync_to_async(node_approve)(node=node)
    assert await Executor.objects.ready(model="smollm2").aexists()
    await comm.disconnect()
    with override_settings(OPTIMAGPT_NODE_AUTO_APPROVE=True):
        other = _communicator()
        other_id = str(uuid.uuid4())
        assert (await _handshake(other, KEY, other_id))["type"] == "welcome"
        assert (await Node.objects.aget(node_id=other_id)).approved
        await other.disconnect()
