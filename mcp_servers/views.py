"""The MCP servers page (/manage/mcp-servers/): add, check, toggle, list tools, delete. MCP Management only.

The work is mcp_servers/services.py's, as for Django admin. The page's script
polls `?format=json` to keep statuses live, and asks for a check of every
server still Connecting (a new one, at once). Nothing here shows a token.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from .forms import NewServerForm
from .models import McpServer
from .services import McpServerInvalid, ServerInput, server_check, server_create, server_delete, server_update

PERMISSION = "accounts.manage_mcp"


def server_out(server: McpServer) -> dict[str, Any]:
    """A server as the page's script sees it (no token, only whether one is set)."""
    return {"id": server.pk, "name": server.name, "where": server.where, "status": server.status,
            "status_label": server.get_status_display(), "error": server.last_error,
            "chat_enabled": server.chat_enabled, "api_enabled": server.api_enabled,
            "tool_count": len(server.tool_list()), "has_token": server.has_token,
            "checked_at": server.checked_at.isoformat() if server.checked_at else None}


def _commands() -> list[str]:
    return sorted(settings.OPTIMAGPT_MCP_STDIO_COMMANDS)


@login_required
@permission_required(PERMISSION, raise_exception=True)
def servers_view(request: HttpRequest) -> HttpResponse:
    servers = list(McpServer.objects.all())
    if request.GET.get("format") == "json":
        return JsonResponse({"data": [server_out(s) for s in servers]})
    form = NewServerForm(request.POST or None, commands=_commands())
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        stdio = bool(data.get("command"))
        try:
            server = async_to_sync(server_create)(ServerInput(
                name=data["name"], transport=McpServer.Transport.STDIO if stdio else McpServer.Transport.HTTP,
                url=data.get("url") or "", command=data.get("command") or ""), token=data.get("token") or "")
        except McpServerInvalid as exc:
            form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        else:
            messages.success(request, f"MCP server {server.name} added; connecting.")
            return redirect("mcp-servers")
    interval = int(settings.OPTIMAGPT_MCP_CHECK_INTERVAL_S)
    return render(request, "mcp_servers/servers.html", {
        "section": "mcp", "servers": servers, "form": form,
        "check_interval": f"{interval // 60} min" if interval >= 120 else f"{interval} s",
    }, status=400 if form.errors else 200)


@login_required
@permission_required(PERMISSION, raise_exception=True)
def server_view(request: HttpRequest, pk: int) -> HttpResponse:
    server = get_object_or_404(McpServer, pk=pk)
    return render(request, "mcp_servers/server.html", {"section": "mcp", "server": server,
                                                        "tools": server.tool_list()})


def _wants_json(request: HttpRequest) -> bool:
    return request.headers.get("Accept", "").startswith("application/json")


@require_POST
@login_required
@permission_required(PERMISSION, raise_exception=True)
def server_refresh_view(request: HttpRequest, pk: int) -> HttpResponse:
    server = async_to_sync(server_check)(pk)
    if server is None:
        if _wants_json(request):
            return JsonResponse({"error": "This MCP server was deleted."}, status=404)
        messages.error(request, "This MCP server was deleted.")
        return redirect("mcp-servers")
    if _wants_json(request):
        return JsonResponse(server_out(server))
    if server.status == McpServer.Status.CONNECTED:
        messages.success(request, f"{server.name}: connected, {len(server.tool_list())} tools.")
    else:
        messages.error(request, f"{server.name}: failed: {server.last_error}")
    return redirect("mcp-servers")


@require_POST
@login_required
@permission_required(PERMISSION, raise_exception=True)
def server_toggle_view(request: HttpRequest, pk: int) -> HttpResponse:
    server = get_object_or_404(McpServer, pk=pk)
    which = request.POST.get("toggle")
    if which not in ("chat", "api"):
        messages.error(request, "Choose Chat or API to turn on or off.")
        return redirect("mcp-servers")
    chat = not server.chat_enabled if which == "chat" else server.chat_enabled
    api = not server.api_enabled if which == "api" else server.api_enabled
    try:
        async_to_sync(server_update)(server, ServerInput(name=server.name, transport=server.transport, url=server.url,
                                                         command=server.command, chat_enabled=chat, api_enabled=api))
    except McpServerInvalid as exc:
        messages.error(request, str(exc))
    else:
        state = "on" if (chat if which == "chat" else api) else "off"
        messages.success(request, f"{server.name}: {'Chat' if which == 'chat' else 'API'} {state}.")
    return redirect("mcp-servers")


@require_POST
@login_required
@permission_required(PERMISSION, raise_exception=True)
def server_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    server = get_object_or_404(McpServer, pk=pk)
    async_to_sync(server_delete)(server)
    messages.success(request, f"MCP server {server.name} deleted; its tools are no longer offered.")
    return redirect("mcp-servers")
