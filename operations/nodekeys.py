"""The node access key in force, and its rotation with a grace period for the previous one.

Until an admin rotates it, the key is OPTIMAGPT_NODE_ACCESS_KEY. A rotation makes a new key (shown once),
stores it encrypted (optimagpt/secrets.py, as upstream keys are, since the gateway must prove it holds the
key too) and keeps the previous one accepted until its grace period ends, so nodes can be moved over one
by one; a handshake with it after that is refused, and a link made with it is closed (nodes/consumers.py).
Where the run command keeps the key in a file that a local node reads (OPTIMAGPT_NODE_ACCESS_KEY_FILE),
the new key is written there, and that node takes it on its next handshake.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from node_agent.protocol import auth_refusal
from optimagpt.secrets import SecretUnreadable, decrypt, encrypt

from .models import GatewaySetting, SettingChange

log = logging.getLogger("optimagpt.operations.nodekeys")

NODE_KEY = "node_access_key"
NODE_KEY_PREVIOUS = "node_access_key_previous"
GRACE_MAX_S = 30 * 24 * 3600.0

_rotated: str = ""  # the stored key, once rotated; else the environment's is in force
_previous: tuple[str, float] | None = None  # the key before the last rotation, accepted until then (epoch)
_rotated_at: datetime | None = None


def _read(row: GatewaySetting | None) -> tuple[str, float]:
    if row is None or not isinstance(row.value, dict):
        return "", 0.0
    try:
        return decrypt(str(row.value.get("encrypted", ""))), float(row.value.get("until") or math.inf)
    except SecretUnreadable:
        log.warning("the stored node access key cannot be decrypted (SECRET_KEY changed?); the environment's applies")
        return "", 0.0


def keys_load(current: GatewaySetting | None, previous: GatewaySetting | None) -> None:
    """Take the stored keys (from operations/config.py's settings_apply)."""
    global _rotated, _previous, _rotated_at
    _rotated, _ = _read(current)
    _rotated_at = current.updated_at if current is not None and _rotated else None
    key, until = _read(previous)
    _previous = (key, until) if key else None


def current_key() -> str:
    return _rotated or str(settings.OPTIMAGPT_NODE_ACCESS_KEY or "")


def accepted() -> list[tuple[str, float]]:
    """The keys a node may prove now, each with when it stops being accepted (inf: the current one)."""
    keys = [(current_key(), math.inf)]
    if _previous is not None and _previous[1] > time.time() and _previous[0] != keys[0][0]:
        keys.append(_previous)
    return keys


def key_accepted(key: str) -> bool:
    """Whether a link made with `key` may go on (checked on each heartbeat)."""
    return any(hmac.compare_digest(key.encode(), k.encode()) for k, _ in accepted() if k)


def handshake_key(auth: dict[str, Any], *, gateway_nonce: str) -> tuple[str, float, str | None]:
    """The key the node's `auth` proved and until when it is accepted, or ("", 0, why it is refused)."""
    refusal: str | None = "the gateway has no node access key configured"
    for key, until in accepted():
        refusal = auth_refusal(auth, key=key, gateway_nonce=gateway_nonce)
        if refusal is None:
            return key, until, None
    return "", 0.0, refusal


def status() -> dict[str, Any]:
    """What the Configuration page may show: whether a key is set and since when, never the key."""
    previous_until = _previous[1] if _previous is not None and _previous[1] > time.time() else None
    return {"set": bool(current_key()), "rotated_at": _rotated_at,
            "source": "Configuration page (rotated)" if _rotated else "environment (OPTIMAGPT_NODE_ACCESS_KEY)",
            "previous_until": datetime.fromtimestamp(previous_until, tz=UTC) if previous_until else None}


def key_rotate(*, username: str, grace_s: float) -> tuple[str, str]:
    """Make and store a new key; the previous one stays accepted for `grace_s`. The new key (shown once) and a
    sentence about the local node's key file."""
    if not 0 <= grace_s <= GRACE_MAX_S:
        raise ValueError(f"The grace period must be between 0 and {GRACE_MAX_S / 86400:g} days.")
    new = secrets.token_urlsafe(32)
    old = current_key()
    until = time.time() + grace_s
    with transaction.atomic():
        GatewaySetting.objects.update_or_create(name=NODE_KEY, defaults={
            "value": {"encrypted": encrypt(new)}, "updated_by": username})
        if old:
            GatewaySetting.objects.update_or_create(name=NODE_KEY_PREVIOUS, defaults={
                "value": {"encrypted": encrypt(old), "until": until}, "updated_by": username})
        SettingChange.objects.create(username=username, name="Node access key", old="(set)" if old else "(none)",
                                     new=f"rotated; the previous key is accepted until "
                                         f"{datetime.fromtimestamp(until, tz=UTC):%Y-%m-%d %H:%M:%S} UTC")
        transaction.on_commit(keys_reload)
    return new, _key_file_write(new)


def keys_reload() -> None:
    rows = {row.name: row for row in GatewaySetting.objects.filter(name__in=(NODE_KEY, NODE_KEY_PREVIOUS))}
    keys_load(rows.get(NODE_KEY), rows.get(NODE_KEY_PREVIOUS))


def _key_file_write(key: str) -> str:
    """Write the new key where the run command's local node reads it; what happened, for the page."""
    path = os.environ.get("OPTIMAGPT_NODE_ACCESS_KEY_FILE")
    if not path:
        return "Give the new key to each node (OPTIMAGPT_NODE_ACCESS_KEY or its _FILE) before the grace period ends."
    target = Path(path)
    try:
        partial = target.with_name(target.name + ".new")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
        os.replace(partial, target)
    except OSError as exc:
        log.warning("could not write the new node access key to %s: %s", path, exc.strerror or exc)
        return f"The key file {path} could not be written ({exc.strerror or exc}): give the new key to each node."
    return (f"The new key was written to {path}: a node reading that file (the local node) takes it on its next "
            "link. Give it to every other node before the grace period ends.")
