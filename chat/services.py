"""Sending a message in a conversation: the user's turn is saved, the reply streams from a node through the
same routed path as /v1/chat/completions, and whatever arrived is saved however the reply ends (complete,
stopped by the user closing the stream, or cut by an error), so a partial reply is never lost."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gateway.dispatch import Streamed, first_event, inference_start
from gateway.mcp_rounds import McpRounds, chat_mcp_selection
from gateway.principal import Principal
from node_agent.protocol import OP_CHAT, OP_TOKENIZE
from optimagpt.errors import ApiError, InvalidRequest

from .models import Conversation, Message

log = logging.getLogger("optimagpt.chat")

TITLE_LENGTH = 60
# The model writes a title after the first reply; past this the conversation keeps its fallback title.
TITLE_TIMEOUT_S = 20.0
# Worded for small models too (SmolLM2 135M answers the message itself when asked more plainly).
TITLE_PROMPT = 'Summarize this request as a short topic title (3 to 6 words):\n\n"{message}"\n'


def conversation_out(c: Conversation) -> dict[str, Any]:
    return {"id": str(c.id), "userId": c.user_id, "title": c.title, "titleSource": c.title_source,
            "modelId": c.model_id, "turnCount": c.turn_count, "status": c.get_status_display(),
            "createdAt": c.created_at.isoformat(), "updatedAt": c.updated_at.isoformat()}


def conversation_settings_out(c: Conversation) -> dict[str, Any]:
    """A conversation with its settings (one conversation's view; lists leave them out)."""
    return {**conversation_out(c), "systemPrompt": c.system_prompt, "temperature": c.temperature,
            "mcpTools": list(c.mcp_tools or [])}


def message_out(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"id": m.pk, "role": m.role, "content": m.content, "status": m.status,
                           "modelId": m.model_id, "createdAt": m.created_at.isoformat()}
    if m.error:
        out["error"] = m.error
    if m.tool_calls:
        out["toolCalls"] = m.tool_calls
    return out


def title_fallback(text: str) -> str:
    """The first words of the first message, on one line: the title until the model's own is made."""
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= TITLE_LENGTH else flat[: TITLE_LENGTH - 1].rstrip() + "…"


@database_sync_to_async
def turn_begin(conversation: Conversation, *, content: str, model_id: str, regenerate: bool) -> list[dict[str, str]]:
    """Save the user's turn (or, to regenerate, drop the last reply) and mark the conversation Running;
    the messages to send to the model."""
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
        # Running past every request's deadline means its gateway died mid-reply: not busy any more.
        running_since = timezone.now() - timedelta(seconds=settings.OPTIMAGPT_REQUEST_DEADLINE_S)
        if conversation.status == Conversation.Status.RUNNING and conversation.updated_at > running_since:
            raise InvalidRequest("A reply is still being written in this conversation.", code="conversation_busy")
        history = list(conversation.messages.all())
        if regenerate:
            if not history:
                raise InvalidRequest("There is no reply to regenerate.", param="regenerate")
            if history[-1].role == Message.Role.ASSISTANT:
                history.pop().delete()
        else:
            history.append(Message.objects.create(conversation=conversation, role=Message.Role.USER, content=content))
            conversation.turn_count += 1
            if not conversation.title:
                conversation.title = title_fallback(content)
        conversation.model_id = model_id
        conversation.status = Conversation.Status.RUNNING
        conversation.save()
    return _prompt(conversation, history)


def _prompt(conversation: Conversation, history: list[Message]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": conversation.system_prompt}] if conversation.system_prompt else []
    return messages + [{"role": m.role, "content": m.content} for m in history]


@database_sync_to_async
def turn_end(conversation: Conversation, *, text: str, model_id: str, status: str, error: str = "",
             tool_calls: list[dict[str, Any]] | None = None) -> Message:
    message = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, content=text,
                                     model_id=model_id, status=status, error=error, tool_calls=tool_calls or [])
    Conversation.objects.filter(pk=conversation.pk).update(
        status=Conversation.Status.ERROR if status == Message.Status.ERROR else Conversation.Status.IDLE)
    conversation.save(update_fields=["updated_at"])
    return message


@database_sync_to_async
def turn_abandon(conversation: Conversation) -> None:
    """No reply was started (no node could take it): the user's turn stays, ready to be regenerated."""
    Conversation.objects.filter(pk=conversation.pk).update(status=Conversation.Status.ERROR)


async def reply_start(*, principal: Principal, conversation: Conversation, content: str, model_id: str,
                      regenerate: bool) -> tuple[Streamed, AsyncGenerator[dict[str, Any], None], dict[str, Any]]:
    """Save the turn and start the reply; errors before the reply's first event raise ApiError.

    With MCP tools chosen for the conversation, the gateway runs the model's calls of them between rounds
    (gateway/mcp_rounds.py), as for an API caller that names MCP servers."""
    messages = await turn_begin(conversation, content=content, model_id=model_id, regenerate=regenerate)
    body = {"model": model_id, "messages": messages, "stream": True, "temperature": conversation.temperature}
    try:
        call: Streamed
        selection = await chat_mcp_selection(conversation.mcp_tools) if conversation.mcp_tools else None
        if selection is not None and selection.tools:
            rounds = McpRounds(principal=principal, body=body, selection=selection, model=model_id, stream=True,
                               announce=True)
            await rounds.start()
            call = rounds
        else:
            call = await inference_start(principal=principal, model=model_id, op=OP_CHAT,
                                         body_json=json.dumps(body), stream=True)
        events, first = await first_event(call)
    except BaseException:
        await turn_abandon(conversation)
        raise
    return call, events, first


async def reply_events(conversation: Conversation, model_id: str, call: Streamed,
                       events: AsyncGenerator[dict[str, Any], None],
                       first: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """The reply as events, which chat/api.py sends as server-sent events: `{"type": "delta", "content": ...}`
    per piece of text, then one `{"type": "done", "message": ...}` or `{"type": "error", "error": ...,
    "message": ...}`. With MCP tools, `{"type": "tool_start", "calls": [...]}` as the gateway starts a round's
    calls and `{"type": "tool_result", "calls": [...]}` (with each call's output) when they are back; the
    calls are saved with the reply (`toolCalls`).

    After the first complete reply the model titles the conversation: `{"type": "title", "title": ...}`.
    A client that closes the stream stops the generation on the node; the text so far is saved as stopped.
    """
    parts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    status, error = Message.Status.STOPPED, ""
    failure: dict[str, Any] = {}
    try:
        event: dict[str, Any] | None = first
        while event is not None:
            if event["type"] == "end":
                status = Message.Status.COMPLETE
                break
            if event["type"] == "tools_start":
                yield {"type": "tool_start", "calls": event["calls"]}
            elif event.get("mcp_calls"):
                tool_calls.extend(event["mcp_calls"])
                yield {"type": "tool_result", "calls": event["mcp_calls"]}
            text = (event.get("delta") or {}).get("content")
            if text:
                parts.append(text)
                yield {"type": "delta", "content": text}
            event = await anext(events, None)
        else:
            status, error = Message.Status.ERROR, "The reply ended before it was complete."
    except ApiError as exc:
        status, error, failure = Message.Status.ERROR, exc.message, exc.body()["error"]
    finally:
        async def wrap_up() -> Message:
            await call.close()  # first: a reply nobody reads must stop on the node
            await events.aclose()
            return await turn_end(conversation, text="".join(parts), model_id=model_id, status=status, error=error,
                                  tool_calls=tool_calls)

        # Done even when the client has gone and this generator is being cancelled (again): shielded.
        message = await asyncio.shield(asyncio.ensure_future(wrap_up()))
    if status == Message.Status.COMPLETE:
        yield {"type": "done", "message": message_out(message)}
        title = await title_write(call.principal, conversation, model_id)
        if title:
            yield {"type": "title", "title": title}
    else:
        failure = failure or {"message": error, "type": "server_error", "param": None, "code": "incomplete_reply"}
        yield {"type": "error", "error": failure, "message": message_out(message)}


def title_clean(text: str) -> str:
    """The model's answer as a title: its first line, without quotes, a "Title:" label or Markdown marks."""
    text = re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.DOTALL)  # a reasoning model's thoughts
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    if line.lstrip().startswith(("```", "~~~", "<")):
        return ""  # code or markup is no title: the fallback stays
    line = re.sub(r"^\s*(#+|\*+|title\s*:)\s*", "", line, flags=re.IGNORECASE)
    line = line.strip().strip("\"'`*_“”‘’").strip().rstrip(".:;,").strip()
    return title_fallback(line) if line else ""


@database_sync_to_async
def _untitled_first_message(conversation: Conversation) -> str:
    """The first message of a conversation after its first reply, while it has only its fallback title; else ""."""
    if not Conversation.objects.filter(pk=conversation.pk, turn_count=1,
                                       title_source=Conversation.TitleSource.FALLBACK).exists():
        return ""
    first = conversation.messages.filter(role=Message.Role.USER).first()
    return first.content if first else ""


@database_sync_to_async
def _title_save(conversation: Conversation, title: str) -> bool:
    """Save the model's title unless the user named the conversation meanwhile (or it is gone)."""
    return bool(Conversation.objects.filter(pk=conversation.pk, title_source=Conversation.TitleSource.FALLBACK)
                .update(title=title, title_source=Conversation.TitleSource.MODEL))


async def _complete(principal: Principal, model_id: str, body: dict[str, Any], op: str = OP_CHAT) -> dict[str, Any]:
    """One unstreamed request over the routed path; its `end` event."""
    call = await inference_start(principal=principal, model=model_id, op=op, body_json=json.dumps(body),
                                 stream=False)
    try:
        async for event in call.events():
            if event["type"] == "end":
                return event
        raise ApiError("The node ended the request without an answer.")
    finally:
        await call.close()


async def title_write(principal: Principal, conversation: Conversation, model_id: str) -> str:
    """After the first reply, ask the model for a title from the first message and save it; "" when there is
    nothing to title or the model could not (the fallback stays)."""
    message = re.sub(r"\s+", " ", await _untitled_first_message(conversation)).strip()[:1000]
    if not message:
        return ""
    body = {"model": model_id, "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": TITLE_PROMPT.format(message=message)}]}
    try:
        async with asyncio.timeout(TITLE_TIMEOUT_S):
            end = await _complete(principal, model_id, body)
    except (ApiError, TimeoutError) as exc:
        log.info("no title from %s for a conversation: %s", model_id, exc)
        return ""
    title = title_clean(((end.get("message") or {}).get("content")) or "")
    return title if title and await _title_save(conversation, title) else ""


@database_sync_to_async
def _context_messages(conversation: Conversation) -> list[dict[str, str]]:
    return _prompt(conversation, list(conversation.messages.all()))


async def context_usage(principal: Principal, conversation: Conversation, model_id: str) -> dict[str, Any]:
    """How much of `model_id`'s context window the conversation's next request takes, part by part, counted by
    the model's own tokenizer on a node (a remote upstream's counts are estimates)."""
    messages = await _context_messages(conversation)
    end = await _complete(principal, model_id, {"model": model_id, "messages": messages}, op=OP_TOKENIZE)
    counts = end.get("counts")
    if not isinstance(counts, dict):
        raise ApiError("The node did not count the tokens.")
    window, used = counts.get("window"), int(counts.get("prompt") or 0)
    out = {part: int(counts.get(part) or 0) for part in ("system", "tools", "user", "assistant", "template")}
    return {"modelId": model_id, "window": window, **out, "used": used,
            "free": max(window - used, 0) if window else None,
            "countedWith": "estimate" if counts.get("estimated") else "tokenizer"}
