from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from optimagpt.secrets import decrypt, encrypt


class Node(models.Model):
    """A machine running the node agent, known by the id it made for itself on first start."""

    class LinkMode(models.TextChoices):
        AGENT_DIALS = "agent", "the node dials the gateway"
        GATEWAY_DIALS = "gateway", "the gateway dials the node"

    node_id = models.UUIDField(unique=True)
    name = models.CharField(max_length=100)
    address = models.CharField(max_length=255, blank=True)
    version = models.CharField(max_length=32, blank=True)
    activated = models.BooleanField(default=True)
    # A node id that first shows up by linking in is routed nothing until an admin approves it (unless
    # OPTIMAGPT_NODE_AUTO_APPROVE); rows the gateway's own code makes (admin-added nodes) are approved.
    approved = models.BooleanField(default=True)
    # The secret this node proves it holds on every link (encrypted, optimagpt/secrets.py): the shared access
    # key alone cannot tell one node from another.
    identity_secret_encrypted = models.TextField(blank=True, editable=False)
    # Enrolled with a token (nodes/enrollment.py): the node proves its own secret, and the shared access key is
    # not needed (nor accepted in its place); deleting or deactivating the node revokes it at once.
    enrolled = models.BooleanField(default=False, editable=False)
    connected = models.BooleanField(default=False)
    # The Channels name of the consumer holding this node's link; requests are sent there.
    channel_name = models.CharField(max_length=255, blank=True)
    hardware = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Gateway-dialed nodes (the agent listens, by default on 8022).
    link_mode = models.CharField(max_length=8, choices=LinkMode.choices, default=LinkMode.AGENT_DIALS)
    host = models.CharField(max_length=255, blank=True, help_text="where the gateway dials the node")
    port = models.PositiveIntegerField(default=8022)
    tls_fingerprint = models.CharField(max_length=95, blank=True,
                                       help_text="SHA-256 of the node's certificate, pinned when it was verified")
    # Which gateway process holds the link, until when: exactly one dials each node.
    dial_owner = models.CharField(max_length=100, blank=True)
    dial_lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=~models.Q(link_mode="gateway") | ~models.Q(host=""),
                                   name="gateway_dialed_node_has_host"),
            models.CheckConstraint(condition=models.Q(port__gte=1, port__lte=65535), name="node_port_in_range"),
        ]

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def live_cutoff() -> datetime:
        """A node not heard from since this moment (3 heartbeats) is treated as gone."""
        return timezone.now() - timedelta(seconds=3 * settings.OPTIMAGPT_HEARTBEAT_INTERVAL_S)


def _on_live_node() -> models.Q:
    return models.Q(node__connected=True, node__activated=True, node__approved=True,
                    node__last_seen__gte=Node.live_cutoff())


def _remote_up() -> models.Q:
    return models.Q(node__isnull=True, enabled=True, state=Executor.State.ONLINE)


class ExecutorQuerySet(models.QuerySet["Executor"]):
    def ready(self, *, model: str | None = None) -> ExecutorQuerySet:
        """Executors that can take a request now: online on an activated node heard from lately, or an
        enabled remote upstream that answered its last check."""
        ready = self.filter((models.Q(state=Executor.State.ONLINE) & _on_live_node()) | _remote_up())
        return ready if model is None else ready.filter(model_id=model)

    def routable(self, *, model: str) -> ExecutorQuerySet:
        """Ready executors, and local ones (re)starting on a live node: a request sent to those waits on
        the node until the process is up, instead of being refused while a crashed process restarts."""
        states = [Executor.State.ONLINE, Executor.State.STARTING]
        return self.filter((models.Q(state__in=states) & _on_live_node()) | _remote_up(), model_id=model)


class Executor(models.Model):
    """One model on one node, as the node reports it; or a remote OpenAI-compatible upstream (no node).

    A local executor's settings live on its node, which applies them; this row
    mirrors what the node last reported. A remote one is configured here.
    """

    class State(models.TextChoices):
        OFFLINE = "offline"
        STARTING = "starting"
        ONLINE = "online"
        STOPPING = "stopping"
        FAILED = "failed"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="executors", null=True, blank=True)
    key = models.CharField(max_length=500, help_text="model file path relative to the node's models folder; "
                                                     "for a remote upstream, its name")
    model_id = models.CharField(max_length=200, db_index=True, help_text="the public model id clients ask for")
    name = models.CharField(max_length=200, blank=True)
    family = models.CharField(max_length=100, blank=True)
    architecture = models.CharField(max_length=64, blank=True)
    parameter_count = models.BigIntegerField(default=0)
    quantization = models.CharField(max_length=32, blank=True)
    context_length = models.PositiveIntegerField(default=0)
    embedding_length = models.PositiveIntegerField(default=0)
    n_ctx = models.PositiveIntegerField(default=0)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    description = models.TextField(blank=True)
    embedding = models.BooleanField(default=False, help_text="serves embeddings only")
    valid = models.BooleanField(default=True)
    enabled = models.BooleanField(default=False)
    replicas = models.PositiveIntegerField(default=1)
    replicas_online = models.PositiveIntegerField(default=0)
    # Requests each process decodes together (continuous batching): the executor has replicas x parallel slots.
    parallel = models.PositiveIntegerField(default=1)
    settings = models.JSONField(default=dict, blank=True, help_text="the settings the node applies")
    state = models.CharField(max_length=16, choices=State.choices, default=State.OFFLINE)
    error = models.TextField(blank=True)
    # Remote upstreams only.
    base_url = models.URLField(max_length=500, blank=True, help_text="OpenAI-compatible base URL, e.g. "
                                                                    "https://api.example.com/v1")
    upstream_model = models.CharField(max_length=200, blank=True, help_text="the model name the upstream knows")
    upstream_key_encrypted = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ExecutorQuerySet.as_manager()

    class Meta:
        ordering = ["model_id"]
        constraints = [
            models.UniqueConstraint(fields=["node", "key"], name="executor_unique_key_per_node"),
            models.UniqueConstraint(fields=["key"], condition=models.Q(node__isnull=True),
                                    name="remote_executor_unique_name"),
            models.CheckConstraint(condition=models.Q(node__isnull=False) | ~models.Q(base_url=""),
                                   name="remote_executor_has_base_url"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id} on {self.node_id or self.base_url}"

    @property
    def is_remote(self) -> bool:
        return self.node_id is None

    @property
    def kind(self) -> str:
        if self.is_remote:
            return "remote"
        return "embedding" if self.embedding else "chat"

    def set_upstream_key(self, raw: str) -> None:
        self.upstream_key_encrypted = encrypt(raw) if raw else ""

    def upstream_key(self) -> str:
        return decrypt(self.upstream_key_encrypted) if self.upstream_key_encrypted else ""


class NodeMetric(models.Model):
    """One sample of a node's load, as it reported it; kept for OPTIMAGPT_METRICS_RETENTION_H."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="metric_samples")
    at = models.DateTimeField(db_index=True)
    cpu_percent = models.FloatField()
    ram_used = models.BigIntegerField()
    ram_total = models.BigIntegerField()
    gpu_percent = models.FloatField(null=True, blank=True)  # mean over the node's GPUs; null without one
    vram_used = models.BigIntegerField(null=True, blank=True)
    vram_total = models.BigIntegerField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["node", "at"], name="nodemetric_node_at")]

    def as_point(self) -> dict[str, object]:
        return {"t": self.at.timestamp(), "cpu": self.cpu_percent, "ram": self.ram_used, "ram_total": self.ram_total,
                "gpu": self.gpu_percent, "vram": self.vram_used, "vram_total": self.vram_total}


class NodeLog(models.Model):
    """A line of a node agent's log, sent over its link; kept for OPTIMAGPT_LOGS_RETENTION_H."""

    class Level(models.TextChoices):
        DEBUG = "DEBUG"
        INFO = "INFO"
        WARNING = "WARNING"
        ERROR = "ERROR"
        CRITICAL = "CRITICAL"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="log_lines")
    at = models.DateTimeField(db_index=True)
    level = models.CharField(max_length=8, choices=Level.choices)
    logger = models.CharField(max_length=100, blank=True)
    message = models.TextField()

    class Meta:
        indexes = [models.Index(fields=["node", "at"], name="nodelog_node_at")]
        ordering = ["at", "pk"]

    def as_line(self) -> dict[str, object]:
        return {"t": self.at.timestamp(), "level": self.level, "logger": self.logger, "message": self.message}


class EnrollmentToken(models.Model):
    """A short-lived token a new node exchanges once (or `uses_allowed` times) for a credential of its own.

    Only a keyed hash is stored (as API keys are); the token is shown once, when it is made.
    """

    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    uses_allowed = models.PositiveIntegerField(null=True, blank=True, help_text="empty: any number until expiry")
    uses = models.PositiveIntegerField(default=0)
    revoked = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return self.name or self.prefix

    def usable(self, now: datetime) -> bool:
        return not self.revoked and now < self.expires_at and (
            self.uses_allowed is None or self.uses < self.uses_allowed)
