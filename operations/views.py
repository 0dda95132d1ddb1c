"""Operations pages and endpoints: Configuration, Diagnostics, the request log, /metrics, /healthz, /readyz.

The three pages need Settings Access. /metrics takes the bearer token in OPTIMAGPT_METRICS_TOKEN (or is
opened with OPTIMAGPT_METRICS_OPEN); /healthz and /readyz are open and say nothing secret.
"""

from __future__ import annotations

import asyncio
import hmac
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.paginator import Paginator
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from certificates.services import certificate_in_force
from certificates.serving import side as https_side
from nodes.models import Executor, Node

from . import config, nodekeys
from .diagnostics import LEVELS, logs_read
from .metrics import REGISTRY
from .models import RequestLogEntry, SettingChange
from .shared import async_client
from .tracing import CHANNELS, store

PERMISSION = "accounts.access_settings"
READY_TIMEOUT_S = 3.0


def _settings_rows() -> list[dict[str, Any]]:
    return [{"editable": e, "value": getattr(settings, e.name), "environment": config.environment()[e.name],
             "source": config.source(e.name), "stored": config.is_stored(e.name)} for e in config.EDITABLE]


@login_required
@permission_required(PERMISSION, raise_exception=True)
def settings_view(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return render(request, "operations/settings.html", _settings_context())
    username = request.user.get_username()
    action = request.POST.get("action", "save")
    if action.startswith("reset:") and action[6:] in config.BY_NAME:
        if config.setting_reset(username=username, name=action[6:]):
            messages.success(request, f"{config.BY_NAME[action[6:]].label}: the environment's value applies again.")
        return redirect("settings")
    if action == "tracing":
        on = request.POST.get("tracing") == "on"
        config.tracing_switch(username=username, on=on)
        how_long = _duration(settings.OPTIMAGPT_TRACING_MAX_S)
        messages.success(request, f"System Tracing is on for {how_long}." if on else "System Tracing is off.")
        return redirect("settings")
    if action == "rotate":
        return _rotate(request, username)
    return _save(request, username)


def _rotate(request: HttpRequest, username: str) -> HttpResponse:
    try:
        grace_s = float(request.POST.get("grace_hours", "")) * 3600
    except ValueError:
        messages.error(request, "The grace period must be a number of hours.")
        return redirect("settings")
    try:
        new_key, note = nodekeys.key_rotate(username=username, grace_s=grace_s)
    except ValueError as exc:
        messages.error(request, str(exc))
        return redirect("settings")
    # Shown this once, on this answer only: never stored readable, never in a message that a reload shows again.
    return render(request, "operations/settings.html", {**_settings_context(), "new_key": new_key, "key_note": note})


def _save(request: HttpRequest, username: str) -> HttpResponse:
    errors: dict[str, str] = {}
    for editable in config.EDITABLE:
        raw = request.POST.get(editable.name)
        if raw is not None:
            try:
                editable.clean(raw)
            except ValueError as exc:
                errors[editable.name] = str(exc)
    if not errors:
        changed = [e.label for e in config.EDITABLE if request.POST.get(e.name) is not None
                   and config.setting_change(username=username, name=e.name, raw=request.POST[e.name])]
        messages.success(request, f"Saved: {', '.join(changed)}." if changed else "Nothing changed.")
        return redirect("settings")
    context = _settings_context()
    for row in context["rows"]:
        row["error"] = errors.get(row["editable"].name, "")
        if row["error"]:
            row["value"] = request.POST.get(row["editable"].name, row["value"])
    return render(request, "operations/settings.html", context, status=400)


def _settings_context() -> dict[str, Any]:
    until = config.tracing_until()
    return {"section": "settings", "rows": _settings_rows(), "tracing_until": until,
            "tracing_until_at": datetime.fromtimestamp(until, tz=UTC) if until else None,
            "tracing_max": _duration(settings.OPTIMAGPT_TRACING_MAX_S), "node_key": nodekeys.status(),
            "changes": SettingChange.objects.all()[:50]}


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


@login_required
@permission_required(PERMISSION, raise_exception=True)
def diagnostics_view(request: HttpRequest) -> HttpResponse:
    return render(request, "operations/diagnostics.html", {
        "section": "diagnostics", "nodes": Node.objects.order_by("name"), "levels": LEVELS, "channels": CHANNELS,
        "tracing_until": config.tracing_until()})


@require_GET
@login_required
@permission_required(PERMISSION, raise_exception=True)
def diagnostics_logs_view(request: HttpRequest) -> JsonResponse:
    try:
        since = float(request.GET.get("since") or 0)
    except ValueError:
        return JsonResponse({"error": "since must be a number of seconds"}, status=400)
    levels = {lv for lv in request.GET.get("levels", "").split(",") if lv in LEVELS}
    return JsonResponse(logs_read(since=since, levels=levels, node=request.GET.get("node", "")))


@require_GET
@login_required
@permission_required(PERMISSION, raise_exception=True)
def diagnostics_traces_view(request: HttpRequest) -> JsonResponse:
    channel = request.GET.get("channel", CHANNELS[0])
    if channel not in CHANNELS:
        return JsonResponse({"error": f"channel must be one of {', '.join(CHANNELS)}"}, status=400)
    return JsonResponse({"channel": channel, "tracing_until": config.tracing_until(), "counts": store.counts(),
                         "traces": store.read(channel)})


# -- the request log -----------------------------------------------------------------------------
FILTERS = ("model", "operation", "status", "who", "client")
STATUS_CHOICES = (("", "all"), ("2xx", "2xx"), ("4xx", "4xx"), ("5xx", "5xx"), ("error", "with an error code"),
                  ("429", "429"), ("499", "499 (client left)"))


def requests_filtered(params: Any) -> Any:
    rows = RequestLogEntry.objects.all()
    if params.get("model"):
        rows = rows.filter(model=params["model"])
    if params.get("operation"):
        rows = rows.filter(operation=params["operation"])
    status = str(params.get("status") or "")
    if status in ("2xx", "3xx", "4xx", "5xx"):
        low = int(status[0]) * 100
        rows = rows.filter(status__gte=low, status__lt=low + 100)
    elif status.isdigit():
        rows = rows.filter(status=int(status))
    elif status == "error":
        rows = rows.exclude(error_code="")
    if params.get("who"):
        who = str(params["who"])
        rows = rows.filter(key_prefix__startswith=who) | rows.filter(user=who)
    if params.get("client"):
        rows = rows.filter(client=params["client"])
    return rows


@login_required
@permission_required(PERMISSION, raise_exception=True)
def requests_view(request: HttpRequest) -> HttpResponse:
    page = Paginator(requests_filtered(request.GET), 50).get_page(request.GET.get("page"))
    query = urlencode({k: request.GET[k] for k in FILTERS if request.GET.get(k)})
    return render(request, "operations/requests.html", {
        "section": "requests", "page": page, "filters": {k: request.GET.get(k, "") for k in FILTERS},
        "status_choices": STATUS_CHOICES,
        "query": query, "operations": RequestLogEntry.objects.values_list("operation", flat=True).distinct()[:50],
        "retention_days": settings.OPTIMAGPT_REQUEST_LOG_RETENTION_DAYS})


# -- /metrics, /healthz, /readyz -------------------------------------------------------------------
def metrics_view(request: HttpRequest) -> HttpResponse:
    token = settings.OPTIMAGPT_METRICS_TOKEN
    if not settings.OPTIMAGPT_METRICS:
        return HttpResponse("Metrics are off (OPTIMAGPT_METRICS=false).\n", status=404, content_type="text/plain")
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            response = HttpResponse("A bearer token is needed: the one in OPTIMAGPT_METRICS_TOKEN.\n", status=401,
                                    content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    elif not settings.OPTIMAGPT_METRICS_OPEN:
        return HttpResponse("Metrics are closed: set OPTIMAGPT_METRICS_TOKEN (scrapers send it as a bearer token), "
                            "or OPTIMAGPT_METRICS_OPEN=true.\n", status=403, content_type="text/plain")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


@require_GET
def healthz_view(request: HttpRequest) -> JsonResponse:
    """The process answers: nothing else is asked."""
    return JsonResponse({"status": "ok"})


def _database_ready() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    cutoff = Node.live_cutoff()
    servable = Executor.objects.ready().values("model_id").distinct().count()
    linked = Node.objects.filter(connected=True, activated=True, last_seen__gte=cutoff).count()
    return {"models_servable": servable, "nodes_linked": linked, "https": _https_ready()}


def _https_ready() -> dict[str, Any]:
    """Whether this process serves HTTPS, and the certificate's days left with the warning from 30 days before
    (details only: an expiring certificate is for an admin to renew, not for a balancer to act on)."""
    summary, _ = certificate_in_force()
    details: dict[str, Any] = {"serving": https_side.listening is not None}
    if summary is not None:
        details.update(not_after=summary.not_after.isoformat(), days_left=summary.days_left())
        if warning := summary.expiry_warning():
            details["warning"] = warning
    return details


async def _channel_layer_ready() -> None:
    if not settings.REDIS_URL:
        return  # the in-memory layer is this process itself
    client = async_client(READY_TIMEOUT_S)  # a connection of its own: is Redis reachable now?
    try:
        await client.ping()  # type: ignore[misc] # redis types sync and async clients alike
    finally:
        await client.aclose()


async def readyz_view(request: HttpRequest) -> JsonResponse:
    """503 when the database or the channel layer cannot be reached. Whether a model can be served is told in
    the body only: nodes dial in through this gateway, so a balancer must not drop it while they are away."""
    checks: dict[str, str] = {}
    body: dict[str, Any] = {}
    try:
        body.update(await asyncio.wait_for(database_sync_to_async(_database_ready)(), READY_TIMEOUT_S))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready", told by its type alone
        checks["database"] = f"unreachable ({type(exc).__name__})"
    try:
        await asyncio.wait_for(_channel_layer_ready(), READY_TIMEOUT_S)
        checks["channel_layer"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["channel_layer"] = f"unreachable ({type(exc).__name__})"
    ready = all(v == "ok" for v in checks.values())
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks, **body},
                        status=200 if ready else 503)
