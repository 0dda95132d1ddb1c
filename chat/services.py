"""Sending a message in a conversation: the user's turn is saved, the reply streams from a node through the
same routed path as /v1/chat/completions, and whatever arrived is saved however the reply ends (complete,
stopped by the user closing the stream, or cut by an error), so a partial reply is never lost."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from datetime import timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gateway.auth import Principal
from gateway.errors import ApiError, InvalidRequest
from gateway.services import RoutedRequest, first_event, inference_start

from .models import Conversation, Message

TITLE_LENGTH = 60


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
    messages = [{"role": "system", "content": conversation.system_prompt}] if conversation.system_prompt else []
    return messages + [{"role": m.role, "content": m.content} for m in history]


@database_sync_to_async
def turn_end(conversation: Conversation, *, text: str, model_id: str, status: str, error: str = "") -> Message:
    message = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, content=text,
                                     model_id=model_id, status=status, error=error)
    Conversation.objects.filter(pk=conversation.pk).update(
        status=Conversation.Status.ERROR if status == Message.Status.ERROR else Conversation.Status.IDLE)
    conversation.save(update_fields=["updated_at"])
    return message


@database_sync_to_async
def turn_abandon(conversation: Conversation) -> None:
    """No reply was started (no node could take it): the user's turn stays, ready to be regenerated."""
    Conversation.objects.filter(pk=conversation.pk).update(status=Conversation.Status.ERROR)


async def reply_start(*, principal: Principal, conversation: Conversation, content: str, model_id: str,
                      regenerate: bool) -> tuple[RoutedRequest, AsyncIterator[dict[str, Any]], dict[str, Any]]:
    """Save the turn and start the reply; errors before the reply's first event raise ApiError."""
    messages = await turn_begin(conversation, content=content, model_id=model_id, regenerate=regenerate)
    body = {"model": model_id, "messages": messages, "stream": True, "temperature": conversation.temperature}
    try:
        call = await inference_start(principal=principal, model=model_id, op="chat", body_json=json.dumps(body),
                                     stream=True)
        events, first = await first_event(call)
    except BaseException:
        await turn_abandon(conversation)
        raise
    return call, events, first


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def reply_stream(conversation: Conversation, model_id: str, call: RoutedRequest,
                       events: AsyncIterator[dict[str, Any]], first: dict[str, Any]) -> AsyncIterator[bytes]:
    """The reply as server-sent events: `{"type": "delta", "content": ...}` per piece of text, then one
    `{"type": "done", "message": ...}` or `{"type": "error", "error": ..., "message": ...}`.

    A client that closes the stream stops the generation on the node; the text so far is saved as stopped.
    """
    from .api import message_out

    parts: list[str] = []
    status, error = Message.Status.STOPPED, ""
    failure: dict[str, Any] = {}
    try:
        event: dict[str, Any] | None = first
        while event is not None:
            if event["type"] == "end":
                status = Message.Status.COMPLETE
                break
            text = (event.get("delta") or {}).get("content")
            if text:
                parts.append(text)
                yield _sse({"type": "delta", "content": text})
            event = await anext(events, None)
        else:
            status, error = Message.Status.ERROR, "The reply ended before it was complete."
    except ApiError as exc:
        status, error, failure = Message.Status.ERROR, exc.message, exc.body()["error"]
    finally:
        async def wrap_up() -> Message:
            await call.close()  # first: a reply nobody reads must stop on the node
            await events.aclose()  # type: ignore[attr-defined]
            return await turn_end(conversation, text="".join(parts), model_id=model_id, status=status, error=error)

        # Done even when the client has gone and this generator is being cancelled (again): shielded.
        message = await asyncio.shield(asyncio.ensure_future(wrap_up()))
    if status == Message.Status.COMPLETE:
        yield _sse({"type": "done", "message": message_out(message)})
    else:
        failure = failure or {"message": error, "type": "server_error", "param": None, "code": "incomplete_reply"}
        yield _sse({"type": "error", "error": failure, "message": message_out(message)})
