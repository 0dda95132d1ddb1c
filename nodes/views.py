"""Nodes and executors pages: nodes with their status, New Node, activation and delete; every model on every
node and each remote upstream, with start, stop and settings.

The same services as /optima/v1/executors do the work (gateway.executors), so a
page and an API call can never disagree. Each view checks Executor Management.
"""

from __future__ import annotations

from datetime import timedelta

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from certificates.services import expiry_warning
from gateway.executors import executor_configure, executor_delete, executor_remote_create
from gateway.optima_api import executor_out
from gateway.routing import load, router
from gateway.stats import stats_summary
from optimagpt.errors import ApiError

from .enrollment import token_create, token_revoke
from .forms import ExecutorSettingsForm, NewNodeForm, RemoteUpstreamForm, RemoteUpstreamUpdateForm
from .models import EnrollmentToken, Executor, Node
from .names import node_name_suggestion
from .outbound import ProbeFailed, node_probe
from .services import node_add_dialed, node_approve, node_delete, node_set_activated
from .status import Demand, node_status

PERMISSION = "accounts.manage_executors"


def _executors() -> list[Executor]:
    return list(Executor.objects.select_related("node").order_by("node__name", "model_id", "key"))


@login_required
@permission_required(PERMISSION, raise_exception=True)
def executors_view(request: HttpRequest) -> HttpResponse:
    if request.GET.get("format") == "json":
        # What the page's script polls to keep states live.
        return JsonResponse({"data": [executor_out(e) for e in _executors()]})
    form = RemoteUpstreamForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            executor = async_to_sync(executor_remote_create)(**form.cleaned_data)
        except ApiError as exc:
            form.add_error(None, exc.message)
        else:
            messages.success(request, f"Remote upstream {executor.key} added: {executor.state}"
                                      f"{' (' + executor.error + ')' if executor.error else ''}.")
            return redirect("executors")
    return render(request, "nodes/executors.html", {
        "section": "executors", "executors": _executors(), "form": form,
    }, status=400 if form.errors else 200)


@login_required
@permission_required(PERMISSION, raise_exception=True)
def executor_view(request: HttpRequest, pk: int) -> HttpResponse:
    executor = get_object_or_404(Executor.objects.select_related("node"), pk=pk)
    form: RemoteUpstreamUpdateForm | ExecutorSettingsForm
    if executor.is_remote:
        form = RemoteUpstreamUpdateForm(request.POST or None, initial={
            f: getattr(executor, f) for f in ("model_id", "base_url", "upstream_model", "description", "embedding",
                                              "enabled")})
    else:
        form = ExecutorSettingsForm.for_executor(executor, request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            async_to_sync(executor_configure)(executor=executor, changes=form.changes())
        except ApiError as exc:
            form.add_error(None, exc.message)
        else:
            messages.success(request, f"Settings of {executor.model_id} saved.")
            return redirect("executor", pk=pk)
    return render(request, "nodes/executor.html", {"section": "executors", "executor": executor, "form": form},
                  status=400 if form.errors else 200)


def _configure_and_report(request: HttpRequest, pk: int, changes: dict[str, bool], done: str) -> HttpResponse:
    executor = get_object_or_404(Executor.objects.select_related("node"), pk=pk)
    try:
        executor = async_to_sync(executor_configure)(executor=executor, changes=changes)
        messages.success(request, f"{executor.model_id} {done}.")
    except ApiError as exc:
        messages.error(request, f"{executor.model_id}: {exc.message}")
    return redirect("executors")


@require_POST
@login_required
@permission_required(PERMISSION, raise_exception=True)
def executor_start_view(request: HttpRequest, pk: int) -> HttpResponse:
    return _configure_and_report(request, pk, {"enabled": True}, "is starting")


@require_POST
@login_required
@permission_required(PERMISSION, raise_exception=True)
def executor_stop_view(request: HttpRequest, pk: int) -> HttpResponse:
    return _configure_and_report(request, pk, {"enabled": False}, "stopped")


@require_POST
@login_required
@permission_required(PERMISSION, raise_exception=True)
def executor_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    executor = get_object_or_404(Executor, pk=pk)
    try:
        async_to_sync(executor_delete)(executor=executor)
        messages.success(request, f"Remote upstream {executor.key} removed.")
    except ApiError as exc:
        messages.error(request, exc.message)
    return redirect("executors")


# -- nodes --------------------------------------------------------------------------
NODE_PERMISSION = "accounts.manage_nodes"


@login_required
@permission_required(NODE_PERMISSION, raise_exception=True)
def nodes_view(request: HttpRequest) -> HttpResponse:
    nodes = list(Node.objects.prefetch_related("executors").order_by("name"))
    if request.GET.get("format") == "json":
        return JsonResponse({"data": [_node_state(node) for node in nodes]})
    return render(request, "nodes/nodes.html", _nodes_context(nodes))


def _nodes_context(nodes: list[Node], **extra: object) -> dict[str, object]:
    summary = stats_summary()
    demand = _demand()
    return {
        "section": "nodes", "rows": [(node, node_status(node, demand)) for node in nodes], "stats": summary,
        "delayed_threshold_s": settings.OPTIMAGPT_DELAYED_REQUEST_S,
        "uptime": timedelta(seconds=int(summary.uptime_s)) if summary.uptime_s is not None else None,
        "tokens": EnrollmentToken.objects.all()[:50], "now": timezone.now(),
        "certificate_warning": expiry_warning(), **extra}


@require_POST
@login_required
@permission_required(NODE_PERMISSION, raise_exception=True)
def enrollment_token_new_view(request: HttpRequest) -> HttpResponse:
    """Make an enrollment token: shown on this answer once, never again."""
    try:
        hours = float(request.POST.get("ttl_hours") or 1)
        uses_text = (request.POST.get("uses") or "").strip()
        uses = int(uses_text) if uses_text else None
        _, raw = token_create(name=request.POST.get("name", ""), ttl_s=hours * 3600, uses=uses,
                              username=request.user.get_username())
    except ValueError as exc:
        messages.error(request, str(exc) if "token" in str(exc).lower() else
                       "The lifetime must be a number of hours and the uses a whole number.")
        return redirect("nodes")
    nodes = list(Node.objects.prefetch_related("executors").order_by("name"))
    return render(request, "nodes/nodes.html", _nodes_context(nodes, new_token=raw,
                                                              gateway_url=request.build_absolute_uri("/")[:-1]))


@require_POST
@login_required
@permission_required(NODE_PERMISSION, raise_exception=True)
def enrollment_token_revoke_view(request: HttpRequest, pk: int) -> HttpResponse:
    token_revoke(pk=pk)
    messages.success(request, "The enrollment token is revoked: nothing more can enroll with it.")
    return redirect("nodes")


@login_required
@permission_required(NODE_PERMISSION, raise_exception=True)
def node_new_view(request: HttpRequest) -> HttpResponse:
    """New Node: name, address, port; Next verifies by connecting; Finish checks the same node again and saves."""
    if request.method != "POST":
        form = NewNodeForm(initial={"name": node_name_suggestion(), "port": 8022})
        return render(request, "nodes/new_node.html", {"section": "nodes", "form": form})
    form = NewNodeForm(request.POST)
    context: dict[str, object] = {"section": "nodes", "form": form}
    if form.is_valid():
        data = form.cleaned_data
        finishing = request.POST.get("step") == "finish" and data["fingerprint"]
        try:
            probe = async_to_sync(node_probe)(host=data["host"], port=data["port"],
                                              expected_fingerprint=data["fingerprint"] if finishing else "")
        except ProbeFailed as exc:
            form.add_error(None, f"Cannot verify {data['host']}:{data['port']}: {exc}")
        else:
            if finishing:
                node = node_add_dialed(name=data["name"], host=data["host"], port=data["port"],
                                       node_id=probe.node_id, fingerprint=probe.fingerprint, version=probe.version)
                if node is None:
                    form.add_error(None, "This node is registered already.")
                else:
                    messages.success(request, f"Node {node.name} added; the gateway is linking to it.")
                    return redirect("nodes")
            else:
                form = NewNodeForm(initial={**data, "fingerprint": probe.fingerprint})
                context.update(form=form, probe=probe)
    return render(request, "nodes/new_node.html", context, status=400 if form.errors else 200)


@login_required
@permission_required(NODE_PERMISSION, raise_exception=True)
def node_name_view(request: HttpRequest) -> HttpResponse:
    """Another name suggestion, for the refresh control of the New Node form."""
    return JsonResponse({"name": node_name_suggestion()})


@require_POST
@login_required
@permission_required(NODE_PERMISSION, raise_exception=True)
def node_activation_view(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=pk)
    activated = request.POST.get("activated") == "true"
    if activated and not node.approved:
        node_approve(node=node)  # a new node waiting for an admin: approving it also activates it
        messages.success(request, f"{node.name} approved; it is routed requests from now on.")
        return redirect("nodes")
    node_set_activated(node=node, activated=activated)
    messages.success(request, f"{node.name} {'activated' if activated else 'deactivated'}.")
    return redirect("nodes")


@require_POST
@login_required
@permission_required(NODE_PERMISSION, raise_exception=True)
def node_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=pk)
    node_delete(node=node)
    messages.success(request, f"{node.name} deleted; nothing on the node itself was touched.")
    return redirect("nodes")


HISTORY_POINTS = 600  # metrics samples a node page starts with (20 minutes at the default one every 2 s)
HISTORY_LINES = 300


def _demand() -> Demand:
    return Demand(in_flight=load.in_flight, queued=router.queued)


def _node_state(node: Node) -> dict[str, object]:
    return {"id": node.pk, "status": node_status(node, _demand()), "connected": node.connected,
            "activated": node.activated,
            "approved": node.approved,
            "last_error": node.last_error,
            "executors": [{"id": e.pk, "model_id": e.model_id, "state": e.state, "enabled": e.enabled,
                           "valid": e.valid, "error": e.error[:200]} for e in node.executors.all()]}


@login_required
@permission_required(NODE_PERMISSION, raise_exception=True)
def node_view(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(Node.objects.prefetch_related("executors"), pk=pk)
    if request.GET.get("format") == "json":
        return JsonResponse(_node_state(node))
    points = [m.as_point() for m in reversed(node.metric_samples.order_by("-at")[:HISTORY_POINTS])]
    lines = [line.as_line() for line in reversed(node.log_lines.order_by("-at", "-pk")[:HISTORY_LINES])]
    hardware = node.hardware or {}
    state = _node_state(node)
    return render(request, "nodes/node.html", {
        "section": "nodes", "node": node, "status": state["status"], "hardware": hardware,
        "gpus": hardware.get("gpus") or [],
        "vram_total": sum(int(g.get("vram_total") or 0) for g in hardware.get("gpus") or []),
        "history": {"points": points, "lines": lines, "state": state},
    })
