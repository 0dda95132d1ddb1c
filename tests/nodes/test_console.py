"""The node console's data and live channel: metrics and log lines kept and published, pruned after retention,
and a console socket only for logged-in users with Node Management."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from channels.auth import AuthMiddlewareStack
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.test import override_settings
from django.utils import timezone

from accounts.models import User
from nodes.console import CLOSE_FORBIDDEN, ConsoleConsumer
from nodes.models import Node, NodeLog, NodeMetric
from nodes.services import node_history_prune, node_logs_record, node_metrics_record
from tests.nodes.test_consumer import KEY, _communicator, _handshake

pytestmark = pytest.mark.django_db(transaction=True)


def _console(user, query: str = "") -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(AuthMiddlewareStack(ConsoleConsumer.as_asgi()), "/ws/console/" + query)
    communicator.scope["user"] = user
    return communicator


async def test_the_console_refuses_visitors_and_users_without_node_management(member: User) -> None:
    for user in (AnonymousUser(), member):
        console = _console(user)
        connected, code = await console.connect()
        assert not connected and code == CLOSE_FORBIDDEN


async def test_a_linked_node_s_metrics_and_logs_are_kept_and_reach_the_console(admin: User) -> None:
    everything, only_other = _console(admin), _console(admin, "?node=999999")
    assert (await everything.connect())[0] and (await only_other.connect())[0]
    link = _communicator()
    node_id = str(uuid.uuid4())
    assert (await _handshake(link, KEY, node_id))["type"] == "welcome"
    node = await Node.objects.aget(node_id=node_id)
    assert await everything.receive_json_from() == {"kind": "link", "connected": True, "node": node.pk}
    await link.send_json_to({"type": "metrics", "metrics": {"cpu_percent": 42.5, "ram_used": 1 << 30,
                                                            "ram_total": 4 << 30, "gpus": []}})
    event = await everything.receive_json_from()
    assert event["kind"] == "metrics" and event["point"]["cpu"] == 42.5 and event["point"]["gpu"] is None
    await link.send_json_to({"type": "logs", "records": [
        {"t": time.time(), "level": "WARNING", "logger": "node_agent.x", "message": "<b>careful</b>"},
        {"t": "garbage", "level": "LOUD", "message": "odd"}, "not a record"]})
    event = await everything.receive_json_from()
    assert [(line["level"], line["message"]) for line in event["lines"]] == [
        ("WARNING", "<b>careful</b>"), ("INFO", "odd")]
    assert await NodeMetric.objects.filter(node=node).acount() == 1
    assert await NodeLog.objects.filter(node=node).acount() == 2
    assert await only_other.receive_nothing(timeout=0.3), "a page watching another node hears nothing"
    await link.disconnect()
    await everything.disconnect()
    await only_other.disconnect()


def test_a_malformed_sample_is_dropped_and_gpus_are_averaged(db) -> None:
    node = Node.objects.create(node_id=uuid.uuid4(), name="n")
    assert node_metrics_record(node_pk=node.pk, sample={"cpu_percent": "x"}) is None
    metric = node_metrics_record(node_pk=node.pk, sample={
        "cpu_percent": 5, "ram_used": 1, "ram_total": 2,
        "gpus": [{"util_percent": 20, "vram_used": 1, "vram_total": 8}, {"util_percent": 60, "vram_used": 3,
                                                                           "vram_total": 8}]})
    assert metric is not None and (metric.gpu_percent, metric.vram_used, metric.vram_total) == (40, 4, 16)


@override_settings(OPTIMAGPT_METRICS_RETENTION_H=1, OPTIMAGPT_LOGS_RETENTION_H=2)
def test_pruning_keeps_only_what_is_within_retention(db) -> None:
    from nodes.tasks import node_history_prune as task

    node = Node.objects.create(node_id=uuid.uuid4(), name="n")
    now = timezone.now()
    for hours in (0.5, 1.5, 3):
        NodeMetric.objects.create(node=node, at=now - timedelta(hours=hours), cpu_percent=1, ram_used=1, ram_total=1)
        NodeLog.objects.create(node=node, at=now - timedelta(hours=hours), level="INFO", message="m")
    assert task.apply().get() == {"metrics": 2, "logs": 1}, "the periodic task runs the pruning"
    assert node_history_prune() == {"metrics": 0, "logs": 0}
    assert NodeMetric.objects.count() == 1 and NodeLog.objects.count() == 2


def test_log_lines_from_the_future_are_kept_at_arrival_time(db) -> None:
    node = Node.objects.create(node_id=uuid.uuid4(), name="n")
    (line,) = node_logs_record(node_pk=node.pk, records=[{"t": time.time() + 86400, "message": "x" * 5000}])
    assert line.at <= timezone.now() and len(line.message) == 4000
