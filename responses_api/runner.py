"""Making one response: the chat completion that answers it, on the routed path, turned into Responses events.

`ResponseRun` sends the request like `/v1/chat/completions` does (gateway/dispatch.py, or
gateway/mcp_rounds.py when MCP servers are among the tools), reads the node's events and turns them into
OpenAI's streaming events and output items, in OpenAI's order, each with a `sequence_number`. An
unstreamed request reads the same events and keeps only the result.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from gateway.dispatch import Streamed, first_event
from gateway.mcp_rounds import McpRounds, McpSelection, chat_start
from gateway.principal import Principal
from gateway.schemas import ChatCompletionIn
from optimagpt.errors import ApiError, InvalidRequest

from .items import CUSTOM_INPUT, ChatTools, new_id, response_object, usage_object


class ResponseRun:
    """One response being made. `prepare()` sends it (errors before any reply raise, for a proper status code);
    `events()` yields the Responses API's events; `snapshot()` is what is stored."""

    def __init__(self, *, principal: Principal, response_id: str, model: str, chat: dict[str, Any],
                 tools: ChatTools, settings: dict[str, Any], own_items: list[dict[str, Any]],
                 listed_servers: set[str], background: bool = False, previous_id: str = "") -> None:
        self.principal = principal
        self.id = response_id
        self.model = model
        self.chat = chat
        self.tools = tools
        self.settings = settings
        self.own_items = own_items
        self.listed_servers = listed_servers  # servers the chain already has an mcp_list_tools item for
        self.background = background
        self.previous_id = previous_id
        self.stream = bool(chat.get("stream"))
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.status = "queued" if background else "in_progress"
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete_details: dict[str, Any] | None = None
        self.failure: ApiError | None = None
        self.history_ms = 0.0  # loading the previous_response_id chain (Server-Timing)
        self._seq = 0
        self._call: Streamed | None = None
        self._chat_events: AsyncGenerator[dict[str, Any], None] | None = None
        self._first: dict[str, Any] | None = None
        self._selection: McpSelection | None = None
        self._message: dict[str, Any] | None = None  # the message item being written
        self._calls: dict[int, dict[str, Any]] = {}  # the round's tool-call index -> its output item
        self._mcp: dict[str, dict[str, Any]] = {}  # MCP call id -> its output item, while it runs
        self._custom_args: dict[str, str] = {}  # custom tool call item id -> the function arguments so far

    # -- what is stored and returned --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "status": self.status, "background": self.background,
                "created_at": self.created_at, "completed_at": self.completed_at, "settings": self.settings,
                "output": self.output, "usage": self.usage, "error": self.error,
                "incomplete_details": self.incomplete_details}

    def object(self) -> dict[str, Any]:
        return response_object(self.snapshot())

    def headers(self) -> dict[str, str]:
        """The answer's headers: the hosted tools left out, and (Server-Timing) the time spent loading the
        previous_response_id chain, which bench/responses.py reads."""
        headers = {"Server-Timing": f"history;dur={self.history_ms:.3f}"}
        if self.tools.ignored:
            headers["x-optimagpt-ignored-tools"] = ", ".join(self.tools.ignored)
        return headers

    # -- sending ----------------------------------------------------------------------------------------
    async def prepare(self) -> None:
        """Admit, route and send the request and wait for its first event; ApiError if it fails before that."""
        try:
            checked = ChatCompletionIn.model_validate(self.chat)
        except ValueError as exc:
            raise InvalidRequest(f"The request cannot be made as a chat completion: {exc}") from None
        self._call = await chat_start(principal=self.principal, body=checked,
                                      body_json=json.dumps(self.chat, ensure_ascii=False), announce=True)
        if isinstance(self._call, McpRounds):
            self._selection = self._call.selection
        self._chat_events, self._first = await first_event(self._call)
        self.status = "in_progress"

    async def close(self) -> None:
        if self._chat_events is not None:
            await self._chat_events.aclose()
        if self._call is not None:
            await self._call.close()

    # -- events -----------------------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """The Responses API's events, from response.created to response.completed, .incomplete or .failed.

        Leaving early (the client went away) stops the node and leaves the response cancelled."""
        assert self._chat_events is not None, "prepare() first"
        yield self._event("response.created", response=self.object())
        yield self._event("response.in_progress", response=self.object())
        try:
            for event in self._tool_lists():
                yield event
            chat_event: dict[str, Any] | None = self._first
            while chat_event is not None:
                for event in self._translated(chat_event):
                    yield event
                if chat_event["type"] == "end":
                    break
                chat_event = await anext(self._chat_events, None)
            else:
                raise ApiError("The reply ended before it was complete.", status=502, type="server_error",
                               code="incomplete_reply")
        except ApiError as exc:
            for event in self._close_all("incomplete"):
                yield event
            self.fail(exc)
            yield self._event("response.failed", response=self.object())
            return
        except BaseException:
            self.status = "cancelled"
            self._close_all("incomplete", quiet=True)
            raise
        finally:
            await self.close()
        self.completed_at = int(time.time())
        if self.status == "incomplete":
            yield self._event("response.incomplete", response=self.object())
        else:
            self.status = "completed"
            yield self._event("response.completed", response=self.object())

    def fail(self, exc: ApiError) -> None:
        self.failure = exc
        self.status = "failed"
        self.error = {"code": exc.code or ("server_error" if exc.status >= 500 else "invalid_request"),
                      "message": exc.message}
        self.completed_at = int(time.time())

    def _added(self, item: dict[str, Any], **shown: Any) -> dict[str, Any]:
        self.output.append(item)
        return self._event("response.output_item.added", output_index=len(self.output) - 1,
                           item={**item, **shown})

    def _done(self, item: dict[str, Any]) -> dict[str, Any]:
        return self._event("response.output_item.done", output_index=self.output.index(item), item=item)

    def _tool_lists(self) -> list[dict[str, Any]]:
        """An mcp_list_tools item for each MCP server the request uses that the chain has not listed yet."""
        if self._selection is None:
            return []
        servers: dict[str, list[dict[str, Any]]] = {}
        for tool in self._selection.tools.values():
            servers.setdefault(tool.server, []).append({"name": tool.tool, "description": tool.description,
                                                        "input_schema": tool.input_schema, "annotations": None})
        events = []
        for label, tools in servers.items():
            if label in self.listed_servers:
                continue
            item = {"id": new_id("mcpl"), "type": "mcp_list_tools", "server_label": label, "tools": tools,
                    "error": None}
            events.append(self._added(item))
            index = len(self.output) - 1
            events.append(self._event("response.mcp_list_tools.in_progress", item_id=item["id"], output_index=index))
            events.append(self._event("response.mcp_list_tools.completed", item_id=item["id"], output_index=index))
            events.append(self._done(item))
        return events

    # text
    def _text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self._message is None:
            events.extend(self._close_calls())
            self._message = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                             "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            events.append(self._added(self._message, content=[]))
            events.append(self._event("response.content_part.added", item_id=self._message["id"],
                                      output_index=len(self.output) - 1, content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        part = self._message["content"][0]
        part["text"] += text
        events.append(self._event("response.output_text.delta", item_id=self._message["id"],
                                  output_index=self.output.index(self._message), content_index=0, delta=text,
                                  logprobs=[]))
        return events

    def _close_message(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self._message = self._message, None
        if item is None:
            return []
        index = self.output.index(item)
        part = item["content"][0]
        item["status"] = status
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._done(item)]

    # the client's tool calls
    def _call_piece(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = int(piece.get("index", 0))
        function = piece.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            events.extend(self._close_message())
            name = function.get("name") or ""
            call_id = piece.get("id") or new_id("call")
            if name in self.tools.custom:
                item = {"id": new_id("ctc"), "type": "custom_tool_call", "status": "in_progress", "call_id": call_id,
                        "name": name, "input": ""}
                self._custom_args[item["id"]] = ""
                events.append(self._added(item))
            else:
                item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call_id,
                        "name": name, "arguments": ""}
                events.append(self._added(item))
            self._calls[index] = item
        delta = function.get("arguments") or ""
        if delta:
            if item["type"] == "custom_tool_call":
                self._custom_args[item["id"]] += delta  # the string is known only once the JSON around it is whole
            else:
                item["arguments"] += delta
                events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                          output_index=self.output.index(item), delta=delta))
        return events

    def _close_calls(self, status: str = "completed", quiet: bool = False) -> list[dict[str, Any]]:
        events = []
        for item in self._calls.values():
            index = self.output.index(item)
            item["status"] = status
            if item["type"] == "custom_tool_call":
                item["input"] = _custom_input(self._custom_args.pop(item["id"], ""))
                if not quiet:
                    events.append(self._event("response.custom_tool_call_input.delta", item_id=item["id"],
                                              output_index=index, delta=item["input"]))
                    events.append(self._event("response.custom_tool_call_input.done", item_id=item["id"],
                                              output_index=index, input=item["input"]))
            elif not quiet:
                events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                          output_index=index, name=item["name"], arguments=item["arguments"]))
            if not quiet:
                events.append(self._done(item))
        self._calls = {}
        return events

    def _close_all(self, status: str, quiet: bool = False) -> list[dict[str, Any]]:
        events = [] if quiet else self._close_message(status)
        if quiet and self._message is not None:
            self._message["status"] = status
            self._message = None
        events.extend(self._close_calls(status, quiet))
        for item in self._mcp.values():
            item["status"] = "failed"
            item["error"] = "The response ended before the call finished."
        self._mcp = {}
        return events

    # MCP calls the gateway runs
    def _mcp_started(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close_all("completed") if self._calls or self._message else []
        if event.get("content"):  # unstreamed: what the model said before its calls
            events.extend(self._text(event["content"]))
            events.extend(self._close_message())
        for call in event["calls"]:
            item = {"id": call["id"], "type": "mcp_call", "status": "in_progress", "server_label": call["server_label"],
                    "name": call["name"], "arguments": call["arguments"], "output": None, "error": None,
                    "approval_request_id": None}
            self._mcp[call["id"]] = item
            events.append(self._added(item))
            index = len(self.output) - 1
            events.append(self._event("response.mcp_call_arguments.delta", item_id=item["id"], output_index=index,
                                      delta=call["arguments"]))
            events.append(self._event("response.mcp_call_arguments.done", item_id=item["id"], output_index=index,
                                      arguments=call["arguments"]))
            events.append(self._event("response.mcp_call.in_progress", item_id=item["id"], output_index=index))
        return events

    def _mcp_finished(self, reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events = []
        for report in reports:
            item = self._mcp.pop(report["id"], None)
            if item is None:
                continue
            index = self.output.index(item)
            if report["error"]:
                item.update(status="failed", error=report["output"])
                events.append(self._event("response.mcp_call.failed", item_id=item["id"], output_index=index))
            else:
                item.update(status="completed", output=report["output"])
                events.append(self._event("response.mcp_call.completed", item_id=item["id"], output_index=index))
            events.append(self._done(item))
        return events

    def _translated(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event["type"]
        if kind == "tools_start":
            return self._mcp_started(event)
        if kind == "end":
            return self._ended(event)
        if event.get("index", 0):
            return []  # n is 1 on this API: there are no other choices
        events: list[dict[str, Any]] = []
        if event.get("mcp_calls"):
            events.extend(self._mcp_finished(event["mcp_calls"]))
        delta = event.get("delta") or {}
        if delta.get("content"):
            events.extend(self._text(delta["content"]))
        for piece in delta.get("tool_calls") or ():
            events.extend(self._call_piece(piece))
        return events

    def _ended(self, end: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        message = end.get("message") or {}
        if not self.stream and message.get("content"):
            events.extend(self._text(message["content"]))
        seen = {item["call_id"] for item in self._calls.values()}
        for position, call in enumerate(message.get("tool_calls") or ()):
            if call.get("id") in seen:
                continue
            function = call.get("function") or {}
            events.extend(self._call_piece({"index": 1000 + position, "id": call.get("id"),
                                            "function": {"name": function.get("name"),
                                                         "arguments": function.get("arguments") or ""}}))
        events.extend(self._close_message())
        events.extend(self._close_calls())
        self.usage = usage_object(end.get("usage"))
        if end.get("finish_reason") == "length":
            self.status = "incomplete"
            self.incomplete_details = {"reason": "max_output_tokens"}
        return events


def _custom_input(arguments: str) -> str:
    """A custom tool's one string, from the function arguments the model wrote ({"input": ...})."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(CUSTOM_INPUT), str):
        return value[CUSTOM_INPUT]
    return arguments
