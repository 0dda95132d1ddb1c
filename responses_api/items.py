"""Between the Responses API and chat completions, which is what nodes and remote upstreams speak.

A request becomes one chat completion body (`chat_request`): instructions as the first system turn, the
stored turns of its `previous_response_id` chain and its own input items as messages, function and custom
tools as functions, MCP servers as the chat endpoint's `{"type": "mcp"}` tools, `text.format` as
`response_format`. What comes back becomes output items (responses_api/runner.py); `response_object` makes
the object OpenAI returns from what is stored or being made.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from mcp_servers.names import offered_names
from optimagpt.errors import InvalidRequest

from .schemas import (
    CustomToolIn,
    FunctionToolIn,
    HostedToolIn,
    McpTool,
    ResponseIn,
    ToolChoiceIn,
    hosted,
)

ID_PREFIXES = {"message": "msg", "function_call": "fc", "custom_tool_call": "ctc", "function_call_output": "fco",
               "custom_tool_call_output": "ctco", "reasoning": "rs", "mcp_list_tools": "mcpl", "mcp_call": "mcp"}
# What a custom tool's one string is called in the function the model is given.
CUSTOM_INPUT = "input"


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def stored_items(items: list[Any]) -> list[dict[str, Any]]:
    """The request's input items as they are kept and listed: plain dicts, each with an id, a message's content
    always a list of parts."""
    stored = []
    for item in items:
        data = item.model_dump(mode="json", by_alias=True, exclude_none=True)
        kind = data.setdefault("type", "message")
        if not data.get("id"):
            data["id"] = new_id(ID_PREFIXES[kind])
        if kind == "message" and isinstance(data["content"], str):
            part = "output_text" if data["role"] == "assistant" else "input_text"
            data["content"] = [{"type": part, "text": data["content"]}]
        stored.append(data)
    return stored


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text") if p.get("text") is not None else p.get("refusal") or "")
                   for p in content or () if isinstance(p, dict))


def chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses items (stored form) as chat messages. Calls join the assistant turn before them; an MCP call
    brings its result along as a tool turn; reasoning and tool lists are not shown to the model."""
    messages: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None  # the open assistant turn, which calls join
    results: list[dict[str, Any]] = []  # the results of its MCP calls, which follow it

    def close() -> None:
        nonlocal assistant
        if assistant is not None:
            messages.append(assistant)
            messages.extend(results)
            results.clear()
            assistant = None

    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            close()
            text = _text(item.get("content"))
            if item.get("role") == "assistant":
                assistant = {"role": "assistant", "content": text}
            else:
                messages.append({"role": "user" if item.get("role") == "user" else "system", "content": text})
        elif kind in ("function_call", "custom_tool_call", "mcp_call"):
            if assistant is None:
                assistant = {"role": "assistant", "content": None}
            if kind == "function_call":
                call_id, name, arguments = item["call_id"], item["name"], item.get("arguments") or ""
            elif kind == "custom_tool_call":
                call_id, name = item["call_id"], item["name"]
                arguments = json.dumps({CUSTOM_INPUT: item.get("input") or ""}, ensure_ascii=False)
            else:
                call_id = item.get("id") or new_id("mcp")
                name = next(iter(offered_names(item["server_label"], [item["name"]])))
                arguments = item.get("arguments") or "{}"
                error = item.get("error")
                output = item.get("output") if error is None else (
                    error if isinstance(error, str) else json.dumps(error, ensure_ascii=False))
                results.append({"role": "tool", "tool_call_id": call_id, "content": output or ""})
            assistant.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            close()
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item.get("output"))})
    close()
    return messages


@dataclass
class ChatTools:
    """The tools of a request as the chat endpoint takes them."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    custom: set[str] = field(default_factory=set)  # names of custom (free-text) tools
    mcp: list[McpTool] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # hosted tool types left out

    def as_chat(self) -> list[dict[str, Any]]:
        return self.tools + [t.model_dump(exclude_none=True) for t in self.mcp]


def chat_tools(body: ResponseIn) -> ChatTools:
    out = ChatTools()
    for tool in body.tools or ():
        if isinstance(tool, FunctionToolIn):
            spec: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object",
                                                                                         "properties": {}}}
            if tool.description:
                spec["description"] = tool.description
            out.tools.append({"type": "function", "function": spec})
        elif isinstance(tool, CustomToolIn):
            out.custom.add(tool.name)
            spec = {"name": tool.name, "parameters": {
                "type": "object", "properties": {CUSTOM_INPUT: {"type": "string", "description": "the tool's input, "
                                                                "free text"}},
                "required": [CUSTOM_INPUT]}}
            if tool.description:
                spec["description"] = tool.description
            out.tools.append({"type": "function", "function": spec})
        elif isinstance(tool, McpTool):
            out.mcp.append(tool)
        elif isinstance(tool, HostedToolIn) and tool.type not in out.ignored:
            out.ignored.append(tool.type)
    return out


def chat_tool_choice(choice: Any, tools: ChatTools) -> Any:
    """The chat completion's tool_choice for a Responses one (a hosted tool's type means "auto")."""
    if choice is None or isinstance(choice, str):
        return choice
    assert isinstance(choice, ToolChoiceIn)
    if choice.type in ("function", "custom"):
        if not choice.name:
            raise InvalidRequest("tool_choice of type function or custom needs a name.", param="tool_choice")
        return {"type": "function", "function": {"name": choice.name}}
    if choice.type == "mcp":
        if not choice.server_label:
            raise InvalidRequest("tool_choice of type mcp needs a server_label.", param="tool_choice")
        if not choice.name:
            return "required"
        return {"type": "function", "function": {"name": next(iter(offered_names(choice.server_label,
                                                                                  [choice.name])))}}
    if choice.type == "allowed_tools":
        allowed = {str(t.get("name") or t.get("server_label") or "") for t in choice.tools or ()}
        tools.tools = [t for t in tools.tools if t["function"]["name"] in allowed]
        tools.mcp = [t for t in tools.mcp if t.server_label in allowed]
        return choice.mode or "auto"
    if hosted(choice.type):
        return "auto"
    raise InvalidRequest(f"tool_choice of type {choice.type} is not supported.", param="tool_choice")


def echoed(body: ResponseIn) -> dict[str, Any]:
    """The request's settings as the response object repeats them."""
    text = body.text.model_dump(mode="json", by_alias=True, exclude_none=True) if body.text else {}
    text.setdefault("format", {"type": "text"})
    choice = body.tool_choice
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None,
        "metadata": body.metadata or {},
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": body.reasoning.model_dump(mode="json") if body.reasoning else {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": text,
        "tool_choice": "auto" if choice is None else choice if isinstance(choice, str) else choice.model_dump(
            mode="json", exclude_none=True),
        "tools": [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in body.tools or ()],
        "top_logprobs": 0,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": body.truncation or "disabled",
        "user": body.user,
    }


def chat_request(body: ResponseIn, history: list[dict[str, Any]], own: list[dict[str, Any]],
                 tools: ChatTools, *, stream: bool) -> dict[str, Any]:
    """The chat completion body that answers `body`, after the stored turns `history` and its own items `own`."""
    messages = chat_messages(history + own)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    if not messages:
        raise InvalidRequest("The input has nothing for the model to answer.", param="input")
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": stream}
    choice = chat_tool_choice(body.tool_choice, tools)
    listed = tools.as_chat()
    if listed:
        chat["tools"] = listed
        if choice is not None:
            chat["tool_choice"] = choice
    elif choice == "required":
        raise InvalidRequest("tool_choice is required, and there are no tools the model could call.",
                             param="tool_choice")
    if body.parallel_tool_calls is not None and listed:
        chat["parallel_tool_calls"] = body.parallel_tool_calls
    if body.text and body.text.format is not None:
        response_format = body.text.format.response_format()
        if response_format is not None:
            chat["response_format"] = response_format
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("user", "user")):
        value = getattr(body, ours)
        if value is not None:
            chat[theirs] = value
    if body.truncation == "auto":
        chat["truncation"] = "auto"  # the node drops the oldest turns until the prompt fits its window
    return chat


def usage_object(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage as the Responses API reports it."""
    if usage is None:
        return None
    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}


def response_object(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The response as OpenAI returns it, from a StoredResponse's `snapshot()` (or a run's, same keys)."""
    return {
        "id": snapshot["id"],
        "object": "response",
        "created_at": snapshot["created_at"],
        "status": snapshot["status"],
        "background": snapshot["background"],
        "completed_at": snapshot.get("completed_at"),
        "error": snapshot.get("error"),
        "incomplete_details": snapshot.get("incomplete_details"),
        "model": snapshot["model"],
        "output": snapshot["output"],
        "usage": snapshot.get("usage"),
        **snapshot["settings"],
    }
