"""The Nodes page's stats: counted per process off the request path, published, summed over live processes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from gateway import stats as gateway_stats
from gateway.models import GatewayProcess
from gateway.stats import ProcessStats, request_finished, request_started, stats_publish, stats_summary
from nodes.models import Node

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_stats(monkeypatch) -> None:
    monkeypatch.setattr(gateway_stats, "stats", ProcessStats())


@override_settings(OPTIMAGPT_DELAYED_REQUEST_S=1.0)
def test_requests_delays_and_concurrency_are_counted_per_node() -> None:
    a = Node.objects.create(node_id=uuid.uuid4(), name="a")
    b = Node.objects.create(node_id=uuid.uuid4(), name="b")
    for _ in range(3):
        request_started(a.pk)
    request_started(b.pk)
    for waited in (0.1, 2.5, 0.2):
        request_finished(a.pk, waited_s=waited)
    request_finished(b.pk, waited_s=0.1)
    s = gateway_stats.stats
    assert (s.requests, s.delayed, s.peak_concurrency, s.in_flight) == (4, 1, 4, 0)
    assert s.peak_per_node == {str(a.pk): 3, str(b.pk): 1}

    stats_publish(owner="host:1:x")
    GatewayProcess.objects.create(owner="host:2:y", started_at=timezone.now() - timedelta(hours=2),
                                  updated_at=timezone.now(), requests=6, delayed=2, peak_concurrency=2,
                                  per_node={str(b.pk): 6}, peak_per_node={str(b.pk): 2})
    GatewayProcess.objects.create(owner="gone:3:z", started_at=timezone.now() - timedelta(days=9),
                                  updated_at=timezone.now() - timedelta(minutes=5), requests=1000)
    summary = stats_summary()
    assert (summary.requests, summary.delayed, summary.peak_concurrency) == (10, 3, 6), "stopped processes left out"
    assert 7100 < summary.uptime_s < 7300, "since the oldest live process started"
    assert summary.node_share == [("b", 7, 0.7, 3), ("a", 3, 0.3, 3)]


def test_the_nodes_page_shows_the_panel_and_the_share_only_with_two_nodes(admin) -> None:
    from django.test import Client

    client = Client()
    client.force_login(admin)
    a = Node.objects.create(node_id=uuid.uuid4(), name="alpha")
    request_started(a.pk)
    request_finished(a.pk, waited_s=0.1)
    stats_publish(owner="host:1:x")
    page = client.get("/manage/nodes/").content.decode()
    assert 'data-stat="requests">1<' in page and 'id="concurrency"' not in page
    b = Node.objects.create(node_id=uuid.uuid4(), name="beta")
    request_started(b.pk)
    request_finished(b.pk, waited_s=0.1)
    stats_publish(owner="host:1:x")
    page = client.get("/manage/nodes/").content.decode()
    assert 'id="concurrency"' in page and "alpha" in page and "50%" in page
