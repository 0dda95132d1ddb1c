"""A user's conversations and OptimaChat preferences, as /optima/v1/conversations reads and writes them.

A conversation belongs to one user: every query here is filtered by that user, and another user's
conversation is ConversationNotFound, exactly like one that does not exist.
"""

from __future__ import annotations

import uuid
from typing import Any

from channels.db import database_sync_to_async
from django.db.models import Q

from optimagpt.errors import ApiError

from .models import DEFAULT_SYSTEM_PROMPT, ChatPreferences, Conversation, Message
from .services import conversation_out, conversation_settings_out, message_out


class ConversationNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "conversation_not_found"


@database_sync_to_async
def conversation_create(user_id: int, values: dict[str, Any]) -> dict[str, Any]:
    title = values.get("title", "").strip()
    conversation = Conversation.objects.create(
        user_id=user_id, title=title, model_id=values.get("modelId", ""),
        title_source=Conversation.TitleSource.USER if title else Conversation.TitleSource.FALLBACK,
        system_prompt=values.get("systemPrompt", DEFAULT_SYSTEM_PROMPT),
        temperature=values.get("temperature", 0.7))
    return conversation_out(conversation)


@database_sync_to_async
def conversations_page(user_id: int, start: int, count: int, search: str) -> tuple[int, list[dict[str, Any]]]:
    mine = Conversation.objects.filter(user_id=user_id)
    if search:
        matching = Message.objects.filter(conversation__user_id=user_id, content__icontains=search)
        mine = mine.filter(Q(title__icontains=search) | Q(pk__in=matching.values("conversation_id")))
    return mine.count(), [conversation_out(c) for c in mine.order_by("-updated_at")[start:start + count]]


def conversation_of(user_id: int, conversation_id: str) -> Conversation:
    """The caller's conversation; someone else's, a missing one and a malformed id all read as missing."""
    try:
        pk = uuid.UUID(conversation_id)
    except ValueError:
        pk = None
    conversation = Conversation.objects.filter(pk=pk, user_id=user_id).first() if pk else None
    if conversation is None:
        raise ConversationNotFound("No such conversation.", param="conversation_id")
    return conversation


@database_sync_to_async
def conversation_with_messages(user_id: int, conversation_id: str) -> dict[str, Any]:
    conversation = conversation_of(user_id, conversation_id)
    return {**conversation_settings_out(conversation),
            "messages": [message_out(m) for m in conversation.messages.all()]}


@database_sync_to_async
def conversation_change(user_id: int, conversation_id: str, values: dict[str, Any]) -> dict[str, Any]:
    conversation = conversation_of(user_id, conversation_id)
    fields = {"title": "title", "modelId": "model_id", "systemPrompt": "system_prompt", "temperature": "temperature",
              "mcpTools": "mcp_tools"}
    for name, value in values.items():
        setattr(conversation, fields[name], value)
    if "title" in values:
        conversation.title_source = Conversation.TitleSource.USER
    conversation.save(update_fields=[fields[name] for name in values]
                      + (["title_source"] if "title" in values else []) + ["updated_at"])
    return conversation_settings_out(conversation)


@database_sync_to_async
def conversation_delete(user_id: int, conversation_id: str) -> None:
    conversation_of(user_id, conversation_id).delete()


@database_sync_to_async
def conversation_of_async(user_id: int, conversation_id: str) -> Conversation:
    return conversation_of(user_id, conversation_id)


@database_sync_to_async
def preferences_update(user_id: int, values: dict[str, Any]) -> dict[str, Any]:
    preferences, _ = ChatPreferences.objects.get_or_create(user_id=user_id)
    if values:
        preferences.expand_blocks = values["expandBlocks"]
        preferences.save()
    return {"expandBlocks": preferences.expand_blocks}
