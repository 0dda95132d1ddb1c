"""Registering, checking and removing MCP servers: what the page, Django admin and the check loop call.

A server is saved as Connecting; a check (the page asks for one at once, the
loop below makes them periodically) connects with the SDK, lists the tools and
saves Connected with them, or Failed with the reason in words. Every save and
delete tells every gateway process (mcp_servers.runtime.forget here, through
gateway/invalidation.py elsewhere), so a deleted server's tools are gone at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from optimagpt.outbound import OutboundRefused, url_check_resolved

from . import runtime
from .client import McpUnavailable, server_probe
from .models import McpServer
from .names import server_name_problem

log = logging.getLogger("optimagpt.mcp")

CHECK_CONCURRENCY = 8
CONNECTING_RECHECK_S = 5.0  # a server saved as Connecting that nobody checked yet waits at most this


class McpServerInvalid(ValueError):
    """What an admin entered cannot be saved; `field` names the form field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ServerInput:
    name: str
    transport: str = McpServer.Transport.HTTP
    url: str = ""
    command: str = ""
    chat_enabled: bool = True
    api_enabled: bool = True


async def server_input_check(data: ServerInput, *, pk: int | None = None) -> None:
    """McpServerInvalid for a bad name, a taken one, a URL the gateway will not call, or an unlisted command."""
    problem = server_name_problem(data.name)
    if problem:
        raise McpServerInvalid(problem, "name")
    taken = McpServer.objects.filter(name__iexact=data.name)
    if pk is not None:
        taken = taken.exclude(pk=pk)
    if await database_sync_to_async(taken.exists)():
        raise McpServerInvalid(f"An MCP server named {data.name!r} exists already.", "name")
    if data.transport == McpServer.Transport.STDIO:
        if data.command not in settings.OPTIMAGPT_MCP_STDIO_COMMANDS:
            listed = ", ".join(sorted(settings.OPTIMAGPT_MCP_STDIO_COMMANDS)) or "none are listed"
            raise McpServerInvalid(f"stdio servers run only commands the operator listed in "
                                   f"OPTIMAGPT_MCP_STDIO_COMMANDS ({listed}).", "command")
        return
    if data.transport != McpServer.Transport.HTTP:
        raise McpServerInvalid("The transport must be http or stdio.", "transport")
    if len(data.url) > 2000:
        raise McpServerInvalid("The endpoint URL is too long.", "url")
    try:
        await url_check_resolved(data.url, name="The endpoint")
    except OutboundRefused as exc:
        raise McpServerInvalid(str(exc), "url") from None


async def server_create(data: ServerInput, *, token: str = "") -> McpServer:
    await server_input_check(data)
    server = McpServer(name=data.name, transport=data.transport, url=data.url if data.transport == "http" else "",
                       command=data.command if data.transport == "stdio" else "", chat_enabled=data.chat_enabled,
                       api_enabled=data.api_enabled)
    server.set_token(token)
    await database_sync_to_async(server.save)()
    return server


async def server_update(server: McpServer, data: ServerInput, *, token: str | None = None) -> McpServer:
    """Change a server; `token` None keeps the stored one, "" removes it. Where it is changed, it is checked again."""
    await server_input_check(data, pk=server.pk)
    moved = (data.transport, data.url, data.command) != (server.transport, server.url, server.command) \
        or token is not None
    server.name, server.transport = data.name, data.transport
    server.url = data.url if data.transport == "http" else ""
    server.command = data.command if data.transport == "stdio" else ""
    server.chat_enabled, server.api_enabled = data.chat_enabled, data.api_enabled
    if token is not None:
        server.set_token(token)
    if moved:
        server.status, server.last_error, server.tools = McpServer.Status.CONNECTING, "", []
    await database_sync_to_async(server.save)()
    return server


async def server_check(pk: int) -> McpServer | None:
    """Connect, list the tools, and save Connected (with them) or Failed (with the reason); None if it is gone."""
    try:
        server = await database_sync_to_async(McpServer.objects.get)(pk=pk)
    except McpServer.DoesNotExist:
        return None
    try:
        tools = await server_probe(runtime.spec_of(server))
    except McpUnavailable as exc:
        status, error, listed = McpServer.Status.FAILED, str(exc)[:500], server.tools
    except Exception as exc:  # noqa: BLE001 - a token SECRET_KEY cannot read, say: Failed, with why
        status, error, listed = McpServer.Status.FAILED, f"{type(exc).__name__}: {exc}"[:500], server.tools
    else:
        status, error, listed = McpServer.Status.CONNECTED, "", [t.as_json() for t in tools]
    server.status, server.last_error, server.tools, server.checked_at = status, error, listed, timezone.now()
    if not await _save_state(server):
        return None
    if status == McpServer.Status.FAILED and error:
        log.warning("MCP server %s failed: %s", server.name, error)
    return server


async def _save_state(server: McpServer) -> bool:
    """Save what a check found (its post_save tells every process); False if the row was deleted meanwhile."""
    try:
        await database_sync_to_async(server.save)(update_fields=["status", "last_error", "tools", "checked_at"])
    except DatabaseError:  # "did not affect any rows": deleted while we checked
        return False
    return True


async def server_delete(server: McpServer) -> None:
    await database_sync_to_async(server.delete)()


@receiver(post_save, sender=McpServer)
@receiver(post_delete, sender=McpServer)
def _server_saved(sender: type[McpServer], instance: McpServer, **kwargs: Any) -> None:
    runtime.forget(instance.pk, gone="created" not in kwargs)  # here; gateway/invalidation.py tells the others


# -- the check loop ----------------------------------------------------------------
async def servers_check_due() -> int:
    """Check the servers due: Connecting ones now, the others every OPTIMAGPT_MCP_CHECK_INTERVAL_S. How many."""
    now = timezone.now()
    interval = settings.OPTIMAGPT_MCP_CHECK_INTERVAL_S
    rows = await database_sync_to_async(lambda: list(McpServer.objects.values_list("pk", "status", "checked_at")))()
    due = [pk for pk, status, checked in rows
           if checked is None or (now - checked).total_seconds() >= interval
           or (status == McpServer.Status.CONNECTING and (now - checked).total_seconds() >= CONNECTING_RECHECK_S)]
    gate = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def one(pk: int) -> None:
        async with gate:
            await server_check(pk)

    await asyncio.gather(*(one(pk) for pk in due), return_exceptions=True)
    return len(due)


async def mcp_check_forever(stop: asyncio.Event) -> None:
    """Check MCP servers until `stop` is set (started by optimagpt/server.py); then close the open sessions."""
    try:
        while not stop.is_set():
            try:
                await servers_check_due()
            except Exception as exc:  # noqa: BLE001 - the database away for a moment: try again next time
                log.warning("MCP check loop: %s", type(exc).__name__)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), min(CONNECTING_RECHECK_S, settings.OPTIMAGPT_MCP_CHECK_INTERVAL_S))
    finally:
        await runtime.connections_close()
