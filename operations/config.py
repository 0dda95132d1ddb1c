"""The gateway settings an admin may change on the Configuration page, and where each value comes from.

The environment stays the default and the way to deploy (optimagpt/settings.py reads it). A value saved
on the page is stored in the database and wins until it is reset; `settings_apply` lays the stored
values over django.conf.settings, so the code that reads `settings.OPTIMAGPT_...` needs no change. Each
save applies in the process that made it once committed, and gateway/invalidation.py tells the other
gateway processes to apply it too. Every change is audited (SettingChange).

Also kept here, as stored settings of their own: System Tracing (on until a moment, never across a
restart), the HTTP-to-HTTPS redirect for browsers (switched on the Certificates page) and the node access
key once rotated (operations/nodekeys.py).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import transaction

from . import nodekeys
from .models import GatewaySetting, SettingChange

log = logging.getLogger("optimagpt.operations.config")

TRACING = "tracing_until"
HTTPS_REDIRECT = "https_redirect"


@dataclass(frozen=True)
class Editable:
    """A setting the page may change: its settings.py name (also its environment variable) and its rules."""

    name: str
    label: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()
    minimum: float = 0.0
    minimum_inclusive: bool = True
    unit: str = ""

    def clean(self, raw: Any) -> Any:
        """The value `raw` (text from a form, or JSON) means, or ValueError with a message for the page."""
        text = str(raw).strip()
        if self.choices:
            if text not in self.choices:
                raise ValueError(f"{self.label} must be one of {', '.join(self.choices)}.")
            return text
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"{self.label} must be a {'whole ' if self.kind is int else ''}number.") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.label} must be a finite number.")
        if value < self.minimum or (value == self.minimum and not self.minimum_inclusive):
            bound = f"{'at least' if self.minimum_inclusive else 'more than'} {self.minimum:g}"
            raise ValueError(f"{self.label} must be {bound}{' ' + self.unit if self.unit else ''}.")
        return value


EDITABLE: tuple[Editable, ...] = (
    Editable("OPTIMAGPT_ROUTING", "Routing strategy", str,
             "least_busy: the executor with the smallest share of its slots in use; round_robin: in turn.",
             choices=("least_busy", "round_robin")),
    Editable("OPTIMAGPT_DELAYED_REQUEST_S", "Delayed-request threshold", float,
             "A request whose first token took longer counts as delayed on the Nodes page.",
             minimum_inclusive=False, unit="s"),
    Editable("OPTIMAGPT_QUEUE_MAX_LENGTH", "Queue length", int,
             "Requests that may wait per model while every slot is busy; more get 429."),
    Editable("OPTIMAGPT_QUEUE_MAX_WAIT_S", "Queue wait", float,
             "The longest a request waits in the queue before it gets 503.", unit="s"),
    Editable("OPTIMAGPT_REQUEST_DEADLINE_S", "Request deadline", float,
             "A request still running this long after it arrived is ended.", minimum_inclusive=False, unit="s"),
    Editable("OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE", "Failed authentications per address", int,
             "Per client address and minute; past it, that address's unauthenticated attempts get 429.",
             minimum=1),
    Editable("OPTIMAGPT_IP_REQUESTS_PER_MINUTE", "Requests per address", int,
             "API requests per client address and minute; 0 turns the limit off."),
)
BY_NAME = {e.name: e for e in EDITABLE}

# The values settings.py read from the environment, before anything stored was laid over them.
_environment: dict[str, Any] = {}
_stored: dict[str, tuple[str, datetime]] = {}  # name -> (who saved it, when): where a value comes from
_tracing_until = 0.0
_https_redirect: bool | None = None  # None: the environment's OPTIMAGPT_HTTPS_REDIRECT


def environment() -> dict[str, Any]:
    if not _environment:
        _environment.update({e.name: getattr(settings, e.name) for e in EDITABLE})
    return _environment


def settings_apply() -> None:
    """Lay the stored values over the environment's (sync; at start-up, after a save, when told of one)."""
    global _tracing_until, _https_redirect
    defaults = environment()
    rows = {row.name: row for row in GatewaySetting.objects.all()}
    stored: dict[str, tuple[str, datetime]] = {}
    for editable in EDITABLE:
        value = defaults[editable.name]
        row = rows.get(editable.name)
        if row is not None:
            try:
                value = editable.clean(row.value)
                stored[editable.name] = (row.updated_by, row.updated_at)
            except ValueError:
                log.warning("the stored value of %s is not valid; the environment's applies", editable.name)
        setattr(settings, editable.name, value)
    _stored.clear()
    _stored.update(stored)
    tracing = rows.get(TRACING)
    _tracing_until = float(tracing.value) if tracing is not None and isinstance(tracing.value, int | float) else 0.0
    redirect = rows.get(HTTPS_REDIRECT)
    _https_redirect = redirect.value if redirect is not None and isinstance(redirect.value, bool) else None
    nodekeys.keys_load(rows.get(nodekeys.NODE_KEY), rows.get(nodekeys.NODE_KEY_PREVIOUS))


def source(name: str) -> str:
    """Where the value in force comes from: the page (who, when), the environment, or the built-in default."""
    if name in _stored:
        who, when = _stored[name]
        return f"Configuration page, by {who or 'someone'} at {when:%Y-%m-%d %H:%M} UTC"
    if name in os.environ or f"{name}_FILE" in os.environ:
        return f"environment ({name})"
    return "built-in default"


def is_stored(name: str) -> bool:
    return name in _stored


def _audit(username: str, name: str, old: Any, new: Any) -> None:
    SettingChange.objects.create(username=username, name=name, old=str(old), new=str(new))


def setting_change(*, username: str, name: str, raw: Any) -> bool:
    """Store a new value of an editable setting (ValueError with a message if it is not valid).

    False when the value is the one in force already (nothing stored, nothing audited).
    """
    editable = BY_NAME[name]
    value = editable.clean(raw)
    old = getattr(settings, name)
    if value == old:
        return False
    with transaction.atomic():
        GatewaySetting.objects.update_or_create(name=name, defaults={"value": value, "updated_by": username})
        _audit(username, name, old, value)
        transaction.on_commit(settings_apply)
    return True


def setting_reset(*, username: str, name: str) -> bool:
    """Forget the page's value: the environment's applies again. False when none was stored."""
    old = getattr(settings, name)
    with transaction.atomic():
        deleted, _ = GatewaySetting.objects.filter(name=name).delete()
        if not deleted:
            return False
        _audit(username, name, old, f"{environment()[name]} (the environment's)")
        transaction.on_commit(settings_apply)
    return True


# -- System Tracing ------------------------------------------------------------------------------
def tracing_on() -> bool:
    """Whether requests are traced now: switched on, and not yet past OPTIMAGPT_TRACING_MAX_S."""
    return _tracing_until > time.time()


def tracing_until() -> float:
    return _tracing_until if tracing_on() else 0.0


def tracing_switch(*, username: str, on: bool) -> None:
    until = time.time() + settings.OPTIMAGPT_TRACING_MAX_S if on else 0.0
    with transaction.atomic():
        if on:
            GatewaySetting.objects.update_or_create(name=TRACING, defaults={"value": until, "updated_by": username})
        else:
            GatewaySetting.objects.filter(name=TRACING).delete()
        _audit(username, "System Tracing", "on" if tracing_on() else "off",
               f"on until {datetime.fromtimestamp(until, tz=UTC):%Y-%m-%d %H:%M:%S} UTC" if on else "off")
        transaction.on_commit(settings_apply)


def tracing_off_at_start() -> None:
    """A gateway that starts traces nothing until someone switches tracing on again (sync, at start-up)."""
    GatewaySetting.objects.filter(name=TRACING).delete()


# -- HTTP to HTTPS for browsers ----------------------------------------------------------------------
def https_redirect_on() -> bool:
    return settings.OPTIMAGPT_HTTPS_REDIRECT if _https_redirect is None else _https_redirect


def https_redirect_switch(*, username: str, on: bool) -> None:
    with transaction.atomic():
        GatewaySetting.objects.update_or_create(name=HTTPS_REDIRECT, defaults={"value": on, "updated_by": username})
        _audit(username, "HTTPS redirect for browsers", "on" if https_redirect_on() else "off", "on" if on else "off")
        transaction.on_commit(settings_apply)
