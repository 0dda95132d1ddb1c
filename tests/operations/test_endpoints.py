"""/metrics (closed unless a token or an explicit opening), /healthz and /readyz, in process."""

from __future__ import annotations

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from nodes.models import Executor, Node

pytestmark = pytest.mark.django_db(transaction=True)


def _families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_metrics_are_closed_by_default(settings: object) -> None:
    settings.OPTIMAGPT_METRICS_TOKEN = ""  # type: ignore[attr-defined]
    settings.OPTIMAGPT_METRICS_OPEN = False  # type: ignore[attr-defined]
    response = Client().get("/metrics")
    assert response.status_code == 403 and b"OPTIMAGPT_METRICS_TOKEN" in response.content


def test_metrics_need_the_token_when_one_is_set(settings: object) -> None:
    settings.OPTIMAGPT_METRICS_TOKEN = "scrape-token-0123456789"  # type: ignore[attr-defined]
    assert Client().get("/metrics").status_code == 401
    assert Client().get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = Client().get("/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    assert "scrape-token" not in response.content.decode()


def test_opened_metrics_report_nodes_executors_and_node_load(settings: object) -> None:
    import uuid

    from django.utils import timezone

    settings.OPTIMAGPT_METRICS_TOKEN = ""  # type: ignore[attr-defined]
    settings.OPTIMAGPT_METRICS_OPEN = True  # type: ignore[attr-defined]
    sample = {"cpu_percent": 12.5, "ram_used": 1000, "ram_total": 4000,
              "gpus": [{"util_percent": 50, "vram_used": 10, "vram_total": 100},
                       {"util_percent": 70, "vram_used": 30, "vram_total": 100}]}
    live = Node.objects.create(node_id=uuid.uuid4(), name="gpu-box", connected=True, last_seen=timezone.now(),
                               metrics=sample)
    Node.objects.create(node_id=uuid.uuid4(), name="gone", connected=False, metrics=sample)
    Executor.objects.create(node=live, key="a.gguf", model_id="a", state=Executor.State.ONLINE)
    Executor.objects.create(node=live, key="b.gguf", model_id="b", state=Executor.State.FAILED)
    families = _families(Client().get("/metrics").content.decode())
    assert families["optimagpt_nodes"].samples[0].value == 2
    assert families["optimagpt_nodes_linked"].samples[0].value == 1
    states = {s.labels["state"]: s.value for s in families["optimagpt_executors"].samples}
    assert states["online"] == 1 and states["failed"] == 1 and states["offline"] == 0
    by_node = {s.labels["node"]: s.value for s in families["optimagpt_node_cpu_percent"].samples}
    assert by_node == {"gpu-box": 12.5}  # a node that is away reports nothing
    assert families["optimagpt_node_gpu_percent"].samples[0].value == 60
    assert families["optimagpt_node_vram_used_bytes"].samples[0].value == 40
    assert families["optimagpt_node_vram_total_bytes"].samples[0].value == 200
    assert families["optimagpt_node_ram_total_bytes"].samples[0].value == 4000
    assert "process_cpu_seconds" in families


def test_healthz_says_ok_and_nothing_else() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_is_ready_with_its_database_whether_or_not_a_model_can_be_served() -> None:
    body = Client().get("/readyz").json()
    assert body["status"] == "ready" and body["checks"] == {"database": "ok", "channel_layer": "ok"}
    assert body["models_servable"] == 0 and body["nodes_linked"] == 0


def test_readyz_is_503_when_the_channel_layer_cannot_be_reached(settings: object) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # type: ignore[attr-defined] # nothing listens on the discard port
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["channel_layer"].startswith("unreachable")
