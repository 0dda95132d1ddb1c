"""Executors pages: every model on every node and each remote upstream; start, stop, settings.

The same services as /optima/v1/executors do the work (gateway.executors), so a
page and an API call can never disagree. Each view checks Executor Management.
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from gateway.errors import ApiError
from gateway.executors import executor_configure, executor_delete, executor_remote_create
from gateway.optima import executor_out

from .forms import ExecutorSettingsForm, RemoteUpstreamForm, RemoteUpstreamUpdateForm
from .models import Executor

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
