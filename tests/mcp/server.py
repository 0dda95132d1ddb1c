"""A real MCP server for the tests, on the SDK's high-level MCPServer: `python -m tests.mcp.server --port N`.

Tools: add, echo, note (appends to --notes, a side effect the tests read), sleep (past the gateway's
timeout), fail (raises), big (a result of N characters). With --token, requests without
`Authorization: Bearer <token>` get 401. --transport sse serves the older SSE transport instead; --redirect-to
answers everything with a redirect.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send


def make_server(notes: Path | None) -> MCPServer:
    server = MCPServer("optimagpt-test")

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> str:
        return str(a + b)

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Write a note down.")
    def note(text: str) -> str:
        if notes is not None:
            with notes.open("a") as f:
                f.write(text + "\n")
        return f"noted: {text}"

    @server.tool(description="Sleep for some seconds, then answer.")
    async def sleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool(description="Always fails.")
    def fail() -> str:
        raise RuntimeError("this tool always fails")

    @server.tool(description="A result of `chars` characters.")
    def big(chars: int) -> str:
        return "x" * chars

    return server


class RedirectAll:
    """Every request answered 307 to another place (a server that moved, or one luring the token elsewhere)."""

    def __init__(self, location: str) -> None:
        self.location = location.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 307, "headers": [(b"location", self.location)]})
        await send({"type": "http.response.body", "body": b""})


class BearerOnly:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.expected:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": "unauthorized"}'})
            return
        await self.app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--notes", type=Path)
    parser.add_argument("--transport", choices=("streamable-http", "sse"), default="streamable-http")
    parser.add_argument("--redirect-to", default="", help="answer every request with a 307 to this URL")
    args = parser.parse_args()
    server = make_server(args.notes)
    app: ASGIApp = server.sse_app() if args.transport == "sse" else server.streamable_http_app()
    if args.redirect_to:
        app = RedirectAll(args.redirect_to)
    if args.token:
        app = BearerOnly(app, args.token)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
