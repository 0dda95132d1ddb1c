"""MCP tools at request time: which are offered, and running one call.

The catalogue (`offered_tools`) is read from the database once and cached
until an MCP server changes (this process's signals at once, other gateway
processes through gateway/invalidation.py). A request that asks for no MCP
server never reads it.

Each gateway process keeps one open session per server it has called
(`_Connection`): a tool round then costs one JSON-RPC call, not a handshake.
The SDK's session must be entered and left in one task, so each connection
holds its own task; a session that fails is closed, and the next call opens a
new one. A tool that fails or times out comes back as an error result for the
model, never as an exception for the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from mcp import Client
from mcp.shared.exceptions import MCPError

from optimagpt.cache import ExpiringCache

from .client import CONNECT_TIMEOUT_S, McpUnavailable, ServerSpec, connected, failure_reason
from .models import McpServer
from .names import offered_names

log = logging.getLogger("optimagpt.mcp")

CATALOGUE_LIFETIME_S = 30.0  # a change reaches this process at once; this only bounds a lost notice


@dataclass(frozen=True)
class OfferedTool:
    """One MCP tool as a model sees it (`name`, an OpenAI function) and as the gateway calls it."""

    name: str  # <server>_<tool>
    server_pk: int
    server: str
    tool: str  # the server's own name for it
    description: str
    input_schema: dict[str, Any]

    def function(self) -> dict[str, Any]:
        """The OpenAI function tool the model is given."""
        schema = self.input_schema if self.input_schema.get("type") == "object" else {"type": "object"}
        return {"type": "function", "function": {"name": self.name, "description": self.description[:1024],
                                                 "parameters": schema}}


@dataclass(frozen=True)
class ServerEntry:
    pk: int
    name: str
    chat: bool
    api: bool
    connected: bool
    spec: ServerSpec = field(repr=False)
    tools: tuple[OfferedTool, ...] = ()


_catalogue: ExpiringCache[str, dict[str, ServerEntry]] = ExpiringCache(lambda: CATALOGUE_LIFETIME_S)


def spec_of(server: McpServer) -> ServerSpec:
    return ServerSpec(name=server.name, transport=server.transport, url=server.url, token=server.token(),
                      command=server.command)


def _entries() -> dict[str, ServerEntry]:
    entries = {}
    for server in McpServer.objects.all():
        try:
            spec = spec_of(server)
        except Exception:  # noqa: BLE001 - a token SECRET_KEY can no longer read: the server is unusable
            log.warning("MCP server %s: its token cannot be decrypted", server.name)
            continue
        tools = server.tool_list()
        names = offered_names(server.name, [t["name"] for t in tools])
        by_tool = {t["name"]: t for t in tools}
        offered = tuple(OfferedTool(name=offered_name, server_pk=server.pk, server=server.name, tool=tool,
                                    description=str(by_tool[tool].get("description") or ""),
                                    input_schema=dict(by_tool[tool].get("input_schema") or {}))
                        for offered_name, tool in names.items())
        entries[server.name] = ServerEntry(pk=server.pk, name=server.name, chat=server.chat_enabled,
                                           api=server.api_enabled,
                                           connected=server.status == McpServer.Status.CONNECTED,
                                           spec=spec, tools=offered)
    return entries


async def servers() -> dict[str, ServerEntry]:
    """Every registered server by name, with its tools as last fetched (cached)."""
    return await _catalogue.get_or_load("all", database_sync_to_async(_entries))


async def chat_tools() -> list[dict[str, Any]]:
    """What a chat user may choose from: Chat-enabled, connected servers and their tools' names and
    descriptions (never a URL or a token)."""
    return [{"server": s.name, "tools": [{"name": t.name, "tool": t.tool, "description": t.description}
                                         for t in s.tools]}
            for s in sorted((await servers()).values(), key=lambda s: s.name) if s.chat and s.connected]


def forget(server_pk: int, *, gone: bool = False) -> None:
    """A server changed (read the catalogue again) or went away (close its open session too); from any thread.

    A change does not close the session: calls running on it finish, and the next call opens a new one if
    the server's address or token changed (`_connection` compares them).
    """
    _catalogue.clear()
    connection = _connections.get(server_pk)
    if gone and connection is not None:
        connection.close_soon()


# -- calling ---------------------------------------------------------------------
@dataclass
class ToolOutcome:
    text: str
    is_error: bool
    duration_s: float


class _Connection:
    """One open session with one server, held by its own task."""

    def __init__(self, server_pk: int, spec: ServerSpec) -> None:
        self.server_pk = server_pk
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self._client: asyncio.Future[Client] = self.loop.create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._hold())
        self.closed = False

    async def _hold(self) -> None:
        try:
            async with connected(self.spec, read_timeout_s=max(settings.OPTIMAGPT_MCP_CALL_TIMEOUT_S, 1) + 5) \
                    as client:
                self._client.set_result(client)
                await self._stop.wait()
        except Exception as exc:  # noqa: BLE001 - the callers hear why; the next call opens a new session
            if not self._client.done():
                self._client.set_exception(exc if isinstance(exc, McpUnavailable)
                                           else McpUnavailable(failure_reason(exc)))
            else:
                log.info("MCP server %s: session ended (%s)", self.spec.name, failure_reason(exc))
        finally:
            self.closed = True
            if not self._client.done():
                self._client.set_exception(McpUnavailable("the session was closed"))
            if _connections.get(self.server_pk) is self:
                del _connections[self.server_pk]

    async def client(self) -> Client:
        return await asyncio.wait_for(asyncio.shield(self._client), CONNECT_TIMEOUT_S + 5)

    def close_soon(self) -> None:
        """Close from any thread."""
        self.closed = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: so is the session
            self.loop.call_soon_threadsafe(self._stop.set)

    async def close(self) -> None:
        self.closed = True
        self._stop.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5)


_connections: dict[int, _Connection] = {}


def _connection(entry: ServerEntry) -> _Connection:
    connection = _connections.get(entry.pk)
    if connection is None or connection.closed or connection.spec != entry.spec:
        if connection is not None:
            connection.close_soon()
        connection = _connections[entry.pk] = _Connection(entry.pk, entry.spec)
    return connection


async def connections_close() -> None:
    """Close every open session (the server is stopping)."""
    await asyncio.gather(*(c.close() for c in list(_connections.values())), return_exceptions=True)
    _connections.clear()


def result_text(result: Any) -> str:
    """A tools/call result as the text the model reads: its text parts, else its structured content as JSON."""
    parts = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            resource = block.resource
            parts.append(getattr(resource, "text", None) or f"[resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{kind} {getattr(block, 'mime_type', '')}]".replace(" ]", "]"))
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def truncated(text: str) -> str:
    """At most OPTIMAGPT_MCP_RESULT_MAX_CHARS characters, with a marker saying how much was cut."""
    limit = settings.OPTIMAGPT_MCP_RESULT_MAX_CHARS
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[truncated by the gateway: {limit} of {len(text)} characters shown]"


async def tool_call(tool: OfferedTool, arguments: dict[str, Any]) -> ToolOutcome:
    """Run one tool call; an error result (never an exception) when the tool fails, times out or is unreachable."""
    started = time.monotonic()
    timeout_s = settings.OPTIMAGPT_MCP_CALL_TIMEOUT_S
    entry = (await servers()).get(tool.server)
    if entry is None:
        return ToolOutcome("The MCP server was removed.", True, time.monotonic() - started)
    connection = _connection(entry)
    try:
        async with asyncio.timeout(timeout_s):
            client = await connection.client()
            result = await client.call_tool(tool.tool, arguments, read_timeout_seconds=timeout_s)
    except TimeoutError:
        text, is_error = f"The tool did not answer within {timeout_s:g} s.", True
    except McpUnavailable as exc:
        connection.close_soon()
        await _mark_failed(entry.pk, str(exc))
        text, is_error = f"The MCP server is unavailable: {exc}", True
    except Exception as exc:  # noqa: BLE001 - the model hears that the tool failed; the request goes on
        if _session_broken(exc):
            connection.close_soon()
        text, is_error = f"The tool failed: {failure_reason(exc)}", True
    else:
        text, is_error = result_text(result), bool(result.is_error)
    return ToolOutcome(truncated(text), is_error, time.monotonic() - started)


async def _mark_failed(pk: int, reason: str) -> None:
    """A call could not connect: Failed (its tools are not offered) until a check finds the server back."""
    def mark() -> None:
        server = McpServer.objects.filter(pk=pk).first()
        if server is not None and server.status != McpServer.Status.FAILED:
            server.status, server.last_error = McpServer.Status.FAILED, reason[:500]
            server.save(update_fields=["status", "last_error"])  # post_save: every process reads the catalogue

    try:
        await database_sync_to_async(mark)()
    except Exception as exc:  # noqa: BLE001 - the database away: the check loop marks it in time
        log.warning("could not mark MCP server %s failed: %s", pk, type(exc).__name__)


def _session_broken(exc: BaseException) -> bool:
    """Whether an error means the session is gone (not just this call failed)."""
    return not isinstance(exc, MCPError)
