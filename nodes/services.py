"""Keeping the ORM in step with what nodes report over their links."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from node_agent.protocol import new_node_secret, proof_matches
from optimagpt.secrets import SecretUnreadable, decrypt, encrypt

from .models import Executor, Node, NodeLog, NodeMetric
from .signals import executors_changed

log = logging.getLogger("optimagpt.nodes")

_EXECUTOR_FIELDS = ("model_id", "name", "family", "architecture", "parameter_count", "quantization",
                    "context_length", "embedding_length", "n_ctx", "size_bytes", "sha256", "description",
                    "embedding", "valid", "replicas", "replicas_online", "parallel", "settings", "state", "error")


class NodeRefused(Exception):
    """The node may not link: it is deactivated or identified itself badly."""


@dataclass(frozen=True)
class LinkOpened:
    node: Node
    replaced: str  # the channel of the link this one replaces ("" if none): the caller closes it
    new_secret: str  # the node's identity secret, when this link is the first to receive one ("" if not)


def node_link_open(*, node_id: str, name: str, version: str, address: str, channel_name: str,
                   identity_proof_of: Callable[[str], str], identity: object) -> LinkOpened:
    """Record that an authenticated node is linked through `channel_name`, once it proved it is that node.

    `identity_proof_of(secret)` is the proof the node must have sent (`identity`) if it holds the secret
    this gateway gave that id before. A node id without a secret yet (new, added by an admin, or known
    from before secrets existed) is given one. Nothing is written for a node that fails to prove itself.
    """
    try:
        uid = uuid.UUID(node_id)
    except ValueError:
        raise NodeRefused("node_id is not a UUID") from None
    new_secret = ""  # nosec B105 # not a password: a token type, a prefix or an empty default
    with transaction.atomic():
        node, created = Node.objects.select_for_update().get_or_create(
            node_id=uid, defaults={"name": name[:100] or str(uid)[:8], "approved": settings.OPTIMAGPT_NODE_AUTO_APPROVE}
        )
        if node.identity_secret_encrypted:
            try:
                secret = decrypt(node.identity_secret_encrypted)
            except SecretUnreadable:
                raise NodeRefused("this node's identity cannot be checked (SECRET_KEY changed): delete the node "
                                  "on the Nodes page to let it link anew") from None
            if not proof_matches(identity_proof_of(secret), identity):
                raise NodeRefused("this node id belongs to another node: the identity proof is missing or wrong")
        if not node.activated:
            raise NodeRefused("this node is deactivated on the gateway")
        if not node.identity_secret_encrypted:
            new_secret = new_node_secret()
            node.identity_secret_encrypted = encrypt(new_secret)
        replaced = node.channel_name if node.connected and node.channel_name != channel_name else ""
        node.version = version[:32]
        node.address = address[:255]
        node.connected = True
        node.channel_name = channel_name
        node.last_seen = timezone.now()
        node.last_error = ""
        # A node that dials in names itself; one the gateway dials keeps the name the admin gave it.
        if not created and name and node.link_mode == Node.LinkMode.AGENT_DIALS and node.name != name[:100]:
            node.name = name[:100]
        node.save()
    executors_changed.send(sender=Node)
    if created and not node.approved:
        log.warning("node %s (%s) linked from %s for the first time; it serves nothing until an admin "
                    "approves it on the Nodes page", node.name, node.node_id, address)
    log.info("node %s (%s) linked from %s", node.name, node.node_id, address)
    return LinkOpened(node, replaced, new_secret)


def node_approve(*, node: Node) -> None:
    Node.objects.filter(pk=node.pk).update(approved=True, activated=True)
    node.approved = node.activated = True
    executors_changed.send(sender=Node)


def node_preregister(*, node_id: str, name: str) -> None:
    """Approve a node id before its first link (the run command's local node: its id is on this machine)."""
    Node.objects.get_or_create(node_id=uuid.UUID(node_id), defaults={"name": name[:100]})


def node_link_closed(*, node_pk: int, channel_name: str, reason: str) -> None:
    """Mark the node disconnected, unless a newer link has taken its place meanwhile."""
    updated = Node.objects.filter(pk=node_pk, channel_name=channel_name).update(
        connected=False, channel_name="", last_error=reason[:2000]
    )
    if updated:
        executors_changed.send(sender=Node)
        log.info("node %s link closed: %s", node_pk, reason)


def node_set_activated(*, node: Node, activated: bool) -> None:
    """Activate or deactivate; a deactivated node's link is closed and refused until it is activated again."""
    Node.objects.filter(pk=node.pk).update(activated=activated)
    node.activated = activated
    if not activated:
        _close_link(node)
    executors_changed.send(sender=Node)


def node_delete(*, node: Node) -> None:
    """Forget the node: its link is closed, its row and executors go; nothing on the node is touched.

    A node that dials in registers again the next time it links: to keep it out, deactivate it instead.
    """
    _close_link(node)
    node.delete()
    executors_changed.send(sender=Node)


def _close_link(node: Node) -> None:
    if node.connected and node.channel_name:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        try:
            async_to_sync(get_channel_layer().send)(node.channel_name, {"type": "node.close"})
        except Exception:  # noqa: BLE001 - a full or unreachable channel: the link ends with its heartbeats
            log.warning("could not ask the link of node %s to close", node.pk)


def nodes_unlink_all(*, reason: str) -> None:
    """Mark every node disconnected (at the start of the only gateway process: no link can have survived)."""
    if Node.objects.filter(connected=True).update(connected=False, channel_name="", last_error=reason):
        executors_changed.send(sender=Node)


def node_handshake_refused(*, node_id: str, address: str, reason: str, dialed: bool = False) -> None:
    """Make a refused handshake visible on the gateway: in the log, and on the node's row when the gateway
    dialed that node itself. A node id an inbound link claims proves nothing: it writes no row."""
    log.warning("node link refused from %s (node_id %.40r): %s", address, node_id, reason)
    if not dialed:
        return
    try:
        uid = uuid.UUID(node_id)
    except ValueError:
        return
    Node.objects.filter(node_id=uid).update(last_error=f"link refused from {address}: {reason}"[:2000])


def node_seen(*, node_pk: int, metrics: dict[str, Any] | None = None) -> None:
    fields: dict[str, Any] = {"last_seen": timezone.now()}
    if metrics is not None:
        fields["metrics"] = metrics
    Node.objects.filter(pk=node_pk).update(**fields)


def node_register(*, node_pk: int, hardware: dict[str, Any], executors: list[dict[str, Any]]) -> None:
    Node.objects.filter(pk=node_pk).update(hardware=hardware)
    executors_sync(node_pk=node_pk, reported=executors)


def _report_values(report: dict[str, Any]) -> dict[str, Any]:
    """The fields of one executor as a node reports it, fitted to the columns (a long name must not fail a sync)."""
    values: dict[str, Any] = {}
    for name in _EXECUTOR_FIELDS:
        if name not in report:
            continue
        value = report[name]
        field = Executor._meta.get_field(name)
        max_length = getattr(field, "max_length", None)
        if max_length and isinstance(value, str):
            value = value[:max_length]
        values[name] = value
    if "parallel" in values:  # slots are counted with it: an integer from 1 to 64, whatever a node says
        parallel = values["parallel"]
        values["parallel"] = min(max(parallel, 1), 64) if isinstance(parallel, int) else 1
    if values.get("state") not in Executor.State.values:
        values["state"] = Executor.State.FAILED
    settings = values.get("settings")
    values["enabled"] = bool(settings.get("enabled")) if isinstance(settings, dict) else False
    return values


def executors_sync(*, node_pk: int, reported: list[dict[str, Any]]) -> None:
    """Make the node's Executor rows exactly what it reported: add, update, and drop the missing."""
    by_key = {str(e["key"]): e for e in reported if e.get("key")}
    with transaction.atomic():
        existing = {e.key: e for e in Executor.objects.select_for_update().filter(node_id=node_pk)}
        Executor.objects.filter(node_id=node_pk).exclude(key__in=list(by_key)).delete()
        for key, report in by_key.items():
            _apply_report(existing.get(key), node_pk, key, _report_values(report))
    executors_changed.send(sender=Executor)


def executor_reported(*, node_pk: int, report: dict[str, Any]) -> Executor:
    """Update one executor from its description (the node's answer to a settings change)."""
    key = str(report.get("key", ""))
    with transaction.atomic():
        existing = Executor.objects.select_for_update().filter(node_id=node_pk, key=key).first()
        executor = _apply_report(existing, node_pk, key, _report_values(report))
    executors_changed.send(sender=Executor)
    return executor


def _apply_report(executor: Executor | None, node_pk: int, key: str, values: dict[str, Any]) -> Executor:
    if executor is None:
        return Executor.objects.create(node_id=node_pk, key=key, **values)
    if any(getattr(executor, f) != v for f, v in values.items()):
        for f, v in values.items():
            setattr(executor, f, v)
        executor.save()
    return executor


# -- gateway-dialed nodes ----------------------------------------------------------
@dataclass(frozen=True)
class DialTarget:
    pk: int
    node_id: str
    host: str
    port: int
    fingerprint: str


def nodes_claim_for_dialing(*, owner: str, lease_s: float) -> list[DialTarget]:
    """Claim (or renew) the leases of activated gateway-dialed nodes that no other process holds.

    One UPDATE whose WHERE only matches a free or expired lease, or the caller's own:
    two processes running it at once cannot both win a node (the second re-checks
    the row after the first commits). Returns the nodes this process now holds.
    """
    now = timezone.now()
    dialed = Node.objects.filter(link_mode=Node.LinkMode.GATEWAY_DIALS, activated=True)
    if not dialed.exists():
        return []  # the common case: no write (on SQLite, an UPDATE takes the write lock even for no row)
    dialed.filter(Q(dial_owner=owner) | Q(dial_lease_until__isnull=True) | Q(dial_lease_until__lt=now)).update(
        dial_owner=owner, dial_lease_until=now + timedelta(seconds=lease_s))
    return [DialTarget(pk=n.pk, node_id=str(n.node_id), host=n.host, port=n.port, fingerprint=n.tls_fingerprint)
            for n in dialed.filter(dial_owner=owner)]


def node_leases_release(*, owner: str) -> None:
    Node.objects.filter(dial_owner=owner).update(dial_owner="", dial_lease_until=None)


def nodes_exist() -> bool:
    return Node.objects.exists()


def node_add_dialed(*, name: str, host: str, port: int, node_id: str, fingerprint: str,
                    version: str = "") -> Node | None:
    """Register a verified listening node for the gateway to dial; None if that node is registered already."""
    try:
        with transaction.atomic():
            # An admin added it, having seen its certificate: approved.
            node = Node.objects.create(node_id=uuid.UUID(node_id), name=name[:100], host=host, port=port,
                                       tls_fingerprint=fingerprint, version=version[:32], approved=True,
                                       link_mode=Node.LinkMode.GATEWAY_DIALS, address=f"{host}:{port}")
    except IntegrityError:
        return None
    executors_changed.send(sender=Node)
    return node


def node_dial_failed(*, node_pk: int, reason: str) -> None:
    log.warning("cannot link node %s: %s", node_pk, reason)
    Node.objects.filter(pk=node_pk).update(last_error=reason[:2000])


# -- metrics and logs -----------------------------------------------------------------
LOG_LEVELS = frozenset(NodeLog.Level.values)
MAX_LOG_MESSAGE = 4000


def node_metrics_record(*, node_pk: int, sample: dict[str, Any]) -> NodeMetric | None:
    """Keep one metrics sample (and refresh last_seen); a malformed sample is dropped, not an error."""
    node_seen(node_pk=node_pk, metrics=sample)
    try:
        gpus = [g for g in sample.get("gpus") or () if isinstance(g, dict)]
        metric = NodeMetric(
            node_id=node_pk, at=timezone.now(), cpu_percent=float(sample["cpu_percent"]),
            ram_used=int(sample["ram_used"]), ram_total=int(sample["ram_total"]),
            gpu_percent=sum(float(g["util_percent"]) for g in gpus) / len(gpus) if gpus else None,
            vram_used=sum(int(g["vram_used"]) for g in gpus) if gpus else None,
            vram_total=sum(int(g["vram_total"]) for g in gpus) if gpus else None,
        )
    except (KeyError, TypeError, ValueError):
        log.warning("node %s sent a malformed metrics sample", node_pk)
        return None
    metric.save()
    return metric


def node_logs_record(*, node_pk: int, records: Any) -> list[NodeLog]:
    """Keep the log lines a node sent; unknown levels count as INFO, long messages are cut."""
    lines = []
    now = timezone.now()
    for record in records if isinstance(records, list) else ():
        if not isinstance(record, dict):
            continue
        level = str(record.get("level", "INFO")).upper()
        try:
            at = datetime.fromtimestamp(float(record["t"]), tz=UTC)
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            at = now
        lines.append(NodeLog(node_id=node_pk, at=min(at, now), level=level if level in LOG_LEVELS else "INFO",
                             logger=str(record.get("logger", ""))[:100],
                             message=str(record.get("message", ""))[:MAX_LOG_MESSAGE]))
    return NodeLog.objects.bulk_create(lines) if lines else []


def node_history_prune() -> dict[str, int]:
    now = timezone.now()
    metrics, _ = NodeMetric.objects.filter(
        at__lt=now - timedelta(hours=settings.OPTIMAGPT_METRICS_RETENTION_H)).delete()
    logs, _ = NodeLog.objects.filter(at__lt=now - timedelta(hours=settings.OPTIMAGPT_LOGS_RETENTION_H)).delete()
    return {"metrics": metrics, "logs": logs}
