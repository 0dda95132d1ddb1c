from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class Node(models.Model):
    """A machine running the node agent, known by the id it made for itself on first start."""

    node_id = models.UUIDField(unique=True)
    name = models.CharField(max_length=100)
    address = models.CharField(max_length=255, blank=True)
    version = models.CharField(max_length=32, blank=True)
    activated = models.BooleanField(default=True)
    connected = models.BooleanField(default=False)
    # The Channels name of the consumer holding this node's link; requests are sent there.
    channel_name = models.CharField(max_length=255, blank=True)
    hardware = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def live_cutoff():  # type: ignore[no-untyped-def]
        """A node not heard from since this moment (3 heartbeats) is treated as gone."""
        return timezone.now() - timedelta(seconds=3 * settings.OPTIMAGPT_HEARTBEAT_INTERVAL_S)


class ExecutorQuerySet(models.QuerySet["Executor"]):
    def ready(self, *, model: str | None = None) -> ExecutorQuerySet:
        """Executors that can take a request now: online, on an activated node heard from lately."""
        ready = self.filter(state=Executor.State.ONLINE, node__connected=True, node__activated=True,
                            node__last_seen__gte=Node.live_cutoff())
        return ready if model is None else ready.filter(model_id=model)


class Executor(models.Model):
    """One model on one node, as the node reports it."""

    class State(models.TextChoices):
        OFFLINE = "offline"
        STARTING = "starting"
        ONLINE = "online"
        STOPPING = "stopping"
        FAILED = "failed"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="executors")
    key = models.CharField(max_length=500, help_text="model file path relative to the node's models folder")
    model_id = models.CharField(max_length=200, db_index=True)
    name = models.CharField(max_length=200, blank=True)
    architecture = models.CharField(max_length=64, blank=True)
    parameter_count = models.BigIntegerField(default=0)
    quantization = models.CharField(max_length=32, blank=True)
    context_length = models.PositiveIntegerField(default=0)
    n_ctx = models.PositiveIntegerField(default=0)
    size_bytes = models.BigIntegerField(default=0)
    state = models.CharField(max_length=16, choices=State.choices, default=State.OFFLINE)
    error = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ExecutorQuerySet.as_manager()

    class Meta:
        ordering = ["model_id"]
        constraints = [models.UniqueConstraint(fields=["node", "key"], name="executor_unique_key_per_node")]

    def __str__(self) -> str:
        return f"{self.model_id} on {self.node_id}"
