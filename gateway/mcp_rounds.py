"""Chat completions that use MCP servers: the gateway runs the model's MCP tool calls and continues, round after round.

A request names servers among its tools (`{"type": "mcp", "server_label": ...}`,
the Responses API's form). Their tools are given to the model as function tools
(`<server>_<tool>`, mcp_servers/names.py) next to the client's own; a client
function of the same name keeps the client's. Each round is one ordinary request
to a node (routed, queued, failed over like any other); between rounds no node
slot is held, and the tools run here (mcp_servers/runtime.py), each with its
timeout. A round that failed over before any reply was a new attempt of the
same round, so no tool call ever runs twice.

The rounds end when the model answers, when it calls a client tool (returned to
the client as usual, for it to run), or after OPTIMAGPT_MCP_MAX_ROUNDS rounds
(finish_reason "mcp_round_limit", with a note). Usage sums every round. What
was called, and what came back, is reported in `mcp_calls`, an extension field
that OpenAI's SDK keeps in `model_extra` and otherwise ignores; streamed, it
rides on a chunk with an empty delta after each round.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from mcp_servers import runtime
from mcp_servers.runtime import OfferedTool
from node_agent.protocol import OP_CHAT
from operations.record import note_tool_start
from optimagpt.errors import ApiError, InvalidRequest

from .dispatch import RoutedRequest, inference_start
from .principal import Principal
from .schemas import ChatCompletionIn, McpTool, ToolChoiceFunction

ROUND_LIMIT_REASON = "mcp_round_limit"


@dataclass
class McpSelection:
    """The MCP tools one request may use, by the name the model sees."""

    tools: dict[str, OfferedTool] = field(default_factory=dict)


async def mcp_selection(principal: Principal, body: ChatCompletionIn) -> McpSelection | None:
    """The MCP tools the request asked for, or None when it asked for no MCP server (nothing changes then).

    Unknown servers, servers not open to the API and servers the key may not use are refused with 400;
    a server that is down has its tools left out until it is back.
    """
    asked = body.mcp_tools()
    defaults = not asked  # the key's defaults: one that is gone or closed to the key is left out, not refused
    if defaults:
        asked = [McpTool(type="mcp", server_label=name) for name in principal.default_mcp_servers()]
    if not asked:
        return None
    if body.n != 1:
        raise InvalidRequest("n must be 1 when MCP tools are used.", param="n")
    catalogue = await runtime.servers()
    client_names = {t.function.name for t in body.function_tools()}
    selection = McpSelection()
    for entry in asked:
        server = catalogue.get(entry.server_label)
        if server is None or not server.api or not principal.allows_mcp_server(entry.server_label):
            if defaults:
                continue
            raise InvalidRequest(f"There is no MCP server '{entry.server_label}' that this key may use.",
                                 param="tools", code="mcp_server_not_found")
        if not server.connected:
            continue
        allowed = entry.tool_names()
        for tool in server.tools:
            if (allowed is None or tool.tool in allowed) and tool.name not in client_names:
                selection.tools[tool.name] = tool
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceFunction) and choice.function.name not in client_names | set(selection.tools):
        raise InvalidRequest(f"tool_choice names '{choice.function.name}', which is not in tools",
                             param="tool_choice")
    return selection


async def chat_mcp_selection(chosen: list[str]) -> McpSelection:
    """The tools an OptimaChat conversation chose: whole servers by name, or single tools by offered name;
    only servers with Chat on and connected. What is gone or turned off is left out."""
    wanted = set(chosen)
    selection = McpSelection()
    for server in (await runtime.servers()).values():
        if not (server.chat and server.connected):
            continue
        for tool in server.tools:
            if server.name in wanted or tool.name in wanted:
                selection.tools[tool.name] = tool
    return selection


def _usage_add(total: dict[str, int], usage: dict[str, Any] | None) -> None:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[key] = total.get(key, 0) + int((usage or {}).get(key) or 0)


class McpRounds:
    """A chat completion with MCP tools; used like a RoutedRequest (`start`, `events`, `close`).

    `events()` yields the node protocol's events as one request would: `delta`s of every round's
    text (and of client tool calls), a `delta` with an empty delta and `mcp_calls` after each tool
    round, and one `end` with the last round's message, the finish reason and the summed usage.
    """

    def __init__(self, *, principal: Principal, body: dict[str, Any], selection: McpSelection, model: str,
                 stream: bool, announce: bool = False) -> None:
        self.principal = principal
        self.announce = announce  # yield a `tools_start` event before running a round's calls (OptimaChat)
        self.model = model
        self.stream = stream
        self.selection = selection
        self.messages: list[dict[str, Any]] = list(body.get("messages") or [])
        client_tools = [t for t in body.get("tools") or () if t.get("type") == "function"]
        self.tools = client_tools + [t.function() for t in selection.tools.values()]
        self.base = {k: v for k, v in body.items() if k not in ("messages", "tools", "tool_choice", "stream",
                                                               "stream_options")}
        self.first_choice = body.get("tool_choice")
        self.calls: list[dict[str, Any]] = []  # what the gateway ran, for `mcp_calls`
        self.usage: dict[str, int] = {}
        self.rounds = 0
        self.tool_s = 0.0  # wall time in tool calls
        # The gateway's own time in tool rounds: from a round's end to the next round sent, less the tools'
        # time (Server-Timing on the answer; bench/mcp.py reads it).
        self.own_s = 0.0
        self._round: RoutedRequest | None = None

    def _round_body(self) -> str:
        body: dict[str, Any] = {**self.base, "messages": self.messages, "stream": self.stream}
        if self.tools:
            body["tools"] = self.tools
            choice = self.first_choice if self.rounds == 1 else "auto"
            if choice is not None:
                body["tool_choice"] = choice
        return json.dumps(body, ensure_ascii=False)

    async def _round_start(self) -> RoutedRequest:
        self.rounds += 1
        self._round = await inference_start(principal=self.principal, model=self.model, op=OP_CHAT,
                                            body_json=self._round_body(), stream=self.stream)
        return self._round

    async def start(self) -> None:
        """Route and send the first round; its errors are the request's (ModelNotFound, NoCapacity, ...)."""
        await self._round_start()

    async def close(self) -> None:
        if self._round is not None:
            await self._round.close()

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        try:
            while True:
                assert self._round is not None, "start() first"
                end = None
                text: list[str] = []  # the round's streamed text (a streamed `end` carries none)
                streamed: dict[int, dict[str, Any]] = {}  # tool-call index -> the call, assembled from deltas
                forwarded: dict[int, int] = {}  # the round's index of a client tool call -> the client's index
                async for event in self._round.events():
                    if event["type"] == "end":
                        end = event  # the last event: the loop ends with it
                        continue
                    delta = event.get("delta", {})
                    calls = delta.get("tool_calls")
                    if not calls:
                        if delta.get("content"):
                            text.append(delta["content"])
                        yield event
                        continue
                    out = []
                    for piece in calls:
                        call = self._assembled(streamed, piece)
                        if call["function"]["name"] in self.selection.tools:
                            continue  # the gateway runs it: the client never sees it
                        index = forwarded.setdefault(piece.get("index", 0), len(forwarded))
                        out.append({**piece, "index": index})
                    if out:
                        yield {**event, "delta": {**event["delta"], "tool_calls": out}}
                ended_at = time.monotonic()
                await self._round.close()
                self._round = None
                if end is None:
                    return
                _usage_add(self.usage, end.get("usage"))
                message = dict(end.get("message") or {"role": "assistant", "content": ""})
                if text and not message.get("content"):
                    message["content"] = "".join(text)  # so the next round's history has what was said
                tool_calls = message.get("tool_calls") or list(streamed.values())
                mine = [c for c in tool_calls if c["function"]["name"] in self.selection.tools]
                theirs = [c for c in tool_calls if c["function"]["name"] not in self.selection.tools]
                # A reply cut at max_tokens: a call in it has arguments cut short, never run (and not shown).
                cut = end.get("finish_reason") == "length"
                if not mine or theirs or cut:
                    # An answer, or a client tool to run (the client gets only its own calls).
                    if theirs:
                        message = {**message, "tool_calls": theirs}
                    elif "tool_calls" in message:
                        message = {k: v for k, v in message.items() if k != "tool_calls"}
                    yield self._end(end, message, end.get("finish_reason") or "stop")
                    return
                if self.rounds >= settings.OPTIMAGPT_MCP_MAX_ROUNDS:
                    note = (f"[The gateway stopped after {self.rounds} rounds of MCP tool calls "
                            f"(OPTIMAGPT_MCP_MAX_ROUNDS).]")
                    if self.stream:
                        yield {"type": "delta", "index": 0, "delta": {"content": note}}
                    yield self._end(end, {"role": "assistant", "content": (message.get("content") or "") + note},
                                    ROUND_LIMIT_REASON)
                    return
                tool_s = self.tool_s
                if self.announce:
                    # Unstreamed, what the model said before its calls is known only now: it rides along.
                    said = {} if self.stream or not message.get("content") else {"content": message["content"]}
                    yield {"type": "tools_start", **said, "calls": [
                        {"id": c["id"], "server_label": self.selection.tools[c["function"]["name"]].server,
                         "name": self.selection.tools[c["function"]["name"]].tool,
                         "arguments": c["function"].get("arguments") or ""} for c in mine]}
                reported = await self._tools_run(message, mine)
                yield {"type": "delta", "index": 0, "delta": {}, "mcp_calls": reported}
                await self._round_start()
                self.own_s += time.monotonic() - ended_at - (self.tool_s - tool_s)
        finally:
            await self.close()

    @staticmethod
    def _assembled(streamed: dict[int, dict[str, Any]], piece: dict[str, Any]) -> dict[str, Any]:
        index = piece.get("index", 0)
        call = streamed.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        if piece.get("id"):
            call["id"] = piece["id"]
        function = piece.get("function") or {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""
        return call

    def server_timing(self) -> str:
        """The Server-Timing header of an unstreamed answer: the gateway's own time in tool rounds, the tools'."""
        return f"mcp;dur={self.own_s * 1000:.3f};desc=\"gateway\", tools;dur={self.tool_s * 1000:.3f}"

    def _end(self, end: dict[str, Any], message: dict[str, Any], finish: str) -> dict[str, Any]:
        if self.stream:
            message = {**message, "content": ""} if message.get("content") else message
        return {"type": "end", "id": end.get("id", ""), "finish_reason": finish, "message": message,
                "usage": dict(self.usage), "mcp_calls": self.calls}

    async def _tools_run(self, message: dict[str, Any], mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the round's MCP calls at once; the assistant turn and the results join the conversation."""
        started = time.monotonic()
        outcomes = await asyncio.gather(*(self._tool_run(c) for c in mine))
        self.tool_s += time.monotonic() - started
        self.messages.append({"role": "assistant", "content": message.get("content") or None, "tool_calls": mine})
        reported = []
        for call, (arguments, outcome) in zip(mine, outcomes, strict=True):
            tool = self.selection.tools[call["function"]["name"]]
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": outcome.text})
            report = {"id": call["id"], "round": self.rounds, "server_label": tool.server, "name": tool.tool,
                      "arguments": arguments, "output": outcome.text, "error": outcome.is_error,
                      "duration_ms": round(outcome.duration_s * 1000, 1)}
            self.calls.append(report)
            reported.append(report)
        return reported

    async def _tool_run(self, call: dict[str, Any]) -> tuple[str, runtime.ToolOutcome]:
        tool = self.selection.tools[call["function"]["name"]]
        noted = note_tool_start(tool.server, tool.tool)  # for the metrics and the trace
        raw = call["function"].get("arguments") or "{}"
        try:
            arguments = json.loads(raw)
            if not isinstance(arguments, dict):
                raise ValueError("not an object")
        except ValueError:
            outcome = runtime.ToolOutcome("The arguments were not a JSON object; call the tool again with "
                                          "valid JSON arguments.", True, 0.0)
        else:
            outcome = await runtime.tool_call(tool, arguments)
        if noted is not None:
            noted.end, noted.error = time.time_ns(), outcome.is_error
        return raw, outcome


async def chat_start(*, principal: Principal, body: ChatCompletionIn, body_json: str,
                     announce: bool = False) -> RoutedRequest | McpRounds:
    """Start a chat completion: through MCP rounds when the request (or, naming none, the key's defaults) uses
    MCP servers, else as one routed request, exactly as before MCP. `body_json` is `body` as JSON text: it
    goes to the node as it is. With `announce`, MCP rounds yield `tools_start` before running calls."""
    wants_mcp = bool(body.mcp_tools()) or bool(principal.default_mcp_servers())
    selection = await mcp_selection(principal, body) if wants_mcp else None
    if selection is None:
        return await inference_start(principal=principal, model=body.model, op=OP_CHAT, body_json=body_json,
                                     stream=body.stream)
    try:
        raw = json.loads(body_json)
    except ValueError:
        raise ApiError("The body is not JSON.") from None
    rounds = McpRounds(principal=principal, body=raw, selection=selection, model=body.model, stream=body.stream,
                       announce=announce)
    await rounds.start()
    return rounds
