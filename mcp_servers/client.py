"""Talking to one MCP server with the official `mcp` SDK: connect, list its tools, call one; failures in words.

Streamable HTTP is tried first and SSE (the older HTTP transport) when the
endpoint does not take Streamable HTTP's POST; stdio servers are commands the
operator listed in OPTIMAGPT_MCP_STDIO_COMMANDS, never a command from a page.
Every HTTP connection goes to an address optimagpt/outbound.py checked (no
link-local or metadata addresses, no DNS rebinding), the SDK follows redirects
only within the endpoint's origin, and the bearer token travels only in the
Authorization header of this client: it is in no message we write.
"""

from __future__ import annotations

import contextlib
import shlex
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpcore2
import httpx2
from django.conf import settings
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from optimagpt.outbound import REFUSED, checked_pool

CONNECT_TIMEOUT_S = 10.0
LIST_PAGES = 20  # tools/list pages read at most (a server that pages for ever is cut off)


@dataclass(frozen=True)
class ServerSpec:
    """What connecting needs, read from the row once (async code does not touch the ORM)."""

    name: str
    transport: str  # McpServer.Transport
    url: str = ""
    token: str = field(default="", repr=False)
    command: str = ""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    input_schema: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema}


class McpUnavailable(Exception):
    """The server could not be reached or did not speak MCP; the message says why, in words, without secrets."""


class _Witness:
    """What the HTTP layer saw, for a failure's reason: the SDK turns a 401 into a generic JSON-RPC error."""

    def __init__(self, had_token: bool = False) -> None:
        self.had_token = had_token
        self.statuses: list[int] = []
        self.errors: list[BaseException] = []

    async def on_response(self, response: httpx2.Response) -> None:
        self.statuses.append(response.status_code)


class _WitnessedTransport(httpx2.AsyncHTTPTransport):
    def __init__(self, witness: _Witness) -> None:
        super().__init__()
        # Connections only to checked addresses (httpx2's transport takes no network backend of its own).
        self._pool = checked_pool(httpcore2.AsyncConnectionPool, httpcore2.AnyIOBackend, httpcore2.ConnectError,
                                  httpx2.create_ssl_context())
        self.witness = witness

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            return await super().handle_async_request(request)
        except Exception as exc:
            self.witness.errors.append(exc)
            raise


def _http_client(spec: ServerSpec, witness: _Witness, *, read_timeout_s: float) -> httpx2.AsyncClient:
    headers = {"Authorization": f"Bearer {spec.token}"} if spec.token else {}
    return httpx2.AsyncClient(headers=headers, transport=_WitnessedTransport(witness), follow_redirects=False,
                              timeout=httpx2.Timeout(CONNECT_TIMEOUT_S, read=read_timeout_s),
                              event_hooks={"response": [witness.on_response]})


def stdio_parameters(command: str) -> StdioServerParameters:
    """The operator's command line for `command`, from OPTIMAGPT_MCP_STDIO_COMMANDS; McpUnavailable if not listed."""
    line = settings.OPTIMAGPT_MCP_STDIO_COMMANDS.get(command)
    if not line:
        raise McpUnavailable(f"the stdio command {command!r} is not listed in OPTIMAGPT_MCP_STDIO_COMMANDS")
    argv = shlex.split(line)
    return StdioServerParameters(command=argv[0], args=argv[1:])


def failure_reason(exc: BaseException, witness: _Witness | None = None) -> str:
    """Why connecting or calling failed, in words an admin can act on."""
    if isinstance(exc, McpUnavailable):
        return str(exc)
    seen = _flatten(exc) + (witness.errors if witness else [])
    statuses = witness.statuses if witness else []
    failed = [s for s in statuses if s >= 400]
    for error in seen:
        text = str(error)
        if REFUSED in text:
            return f"refused: the endpoint {REFUSED}"
    if 401 in failed or 403 in failed:
        status = 401 if 401 in failed else 403
        if status == 403:
            return "403: the server does not allow this token"
        had_token = witness is not None and witness.had_token
        return "401: the server refused the bearer token" if had_token else "401: the server needs a bearer token"
    for error in seen:
        if isinstance(error, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(error) or "SSL" in str(error):
            return "TLS: the server's certificate could not be verified (or it does not speak TLS)"
    for error in seen:
        if isinstance(error, httpx2.TimeoutException | TimeoutError):
            return "timed out: the server did not answer in time"
    for error in seen:
        if isinstance(error, httpx2.ConnectError | ConnectionRefusedError | httpcore2.ConnectError):
            text = str(error)
            if "could not be resolved" in text or "does not resolve" in text:
                return "refused: the host name could not be resolved"
            return "refused: nothing accepted the connection at this address"
    if failed:
        return f"not an MCP server: the endpoint answered HTTP {failed[-1]}"
    if any(300 <= s < 400 for s in statuses):
        return "refused: the endpoint redirects elsewhere, which is not followed (register that address instead)"
    for error in seen:
        if isinstance(error, FileNotFoundError | PermissionError):
            return f"the stdio command could not be started ({type(error).__name__})"
    return f"not an MCP server: {type(exc).__name__}: {str(exc)[:200]}"


def _flatten(exc: BaseException) -> list[BaseException]:
    """The exception, the groups' members and the causes, depth-first."""
    out: list[BaseException] = []
    stack = [exc]
    while stack and len(out) < 50:
        error = stack.pop()
        out.append(error)
        if isinstance(error, BaseExceptionGroup):
            stack.extend(error.exceptions)
        for linked in (error.__cause__, error.__context__):
            if linked is not None and linked not in out:
                stack.append(linked)
    return out


@contextlib.asynccontextmanager
async def connected(spec: ServerSpec, *, read_timeout_s: float) -> AsyncIterator[Client]:
    """An initialised MCP client session with the server; McpUnavailable (with the reason) if there is none."""
    if spec.transport == "stdio":
        async with _session(stdio_client(stdio_parameters(spec.command)), None, read_timeout_s) as client:
            yield client
        return
    witness = _Witness(bool(spec.token))
    try:
        async with _http_client(spec, witness, read_timeout_s=read_timeout_s) as http, \
                _session(streamable_http_client(spec.url, http_client=http), witness, read_timeout_s) as client:
            yield client
        return
    except McpUnavailable:
        if not any(s in (404, 405) for s in witness.statuses):
            raise
    # The endpoint does not take Streamable HTTP's POST: an older server, on the SSE transport.
    witness = _Witness(bool(spec.token))

    def factory(headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None,
                auth: httpx2.Auth | None = None) -> httpx2.AsyncClient:
        return _http_client(spec, witness, read_timeout_s=read_timeout_s)

    async with _session(sse_client(spec.url, timeout=CONNECT_TIMEOUT_S, sse_read_timeout=read_timeout_s,
                                   httpx_client_factory=factory), witness, read_timeout_s) as client:
        yield client


@contextlib.asynccontextmanager
async def _session(transport: Any, witness: _Witness | None, read_timeout_s: float) -> AsyncIterator[Client]:
    client = Client(transport, read_timeout_seconds=read_timeout_s, mode="legacy", cache=None)
    try:
        await client.__aenter__()
    except Exception as exc:  # noqa: BLE001 - whatever failed, the admin gets the reason in words
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)
        raise McpUnavailable(failure_reason(exc, witness)) from None
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)


async def tools_list(client: Client) -> list[ToolSpec]:
    """Every tool the server lists (following its pages)."""
    tools: list[ToolSpec] = []
    cursor: str | None = None
    for _ in range(LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        for tool in page.tools:
            tools.append(ToolSpec(name=tool.name, description=tool.description or "",
                                  input_schema=dict(tool.input_schema or {"type": "object"})))
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


async def server_probe(spec: ServerSpec) -> list[ToolSpec]:
    """Connect and list the tools; McpUnavailable with the reason when that fails."""
    async with connected(spec, read_timeout_s=CONNECT_TIMEOUT_S) as client:
        try:
            return await tools_list(client)
        except Exception as exc:  # noqa: BLE001 - a server that connects but cannot list is no use either
            raise McpUnavailable(failure_reason(exc)) from None
