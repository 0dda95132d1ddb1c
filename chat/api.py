"""/optima/v1/conversations: a user's OptimaChat conversations, for JWT clients.

A conversation belongs to one user: every query here is filtered by the caller, and another user's
conversation is answered 404, exactly like one that does not exist. A key without an owner has no
conversations (403).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from channels.db import database_sync_to_async
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from ninja import Router
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import ChatAuth, Principal
from gateway.errors import ApiError, InvalidRequest, PermissionDenied
from gateway.optima import json_object, validated
from gateway.sse import SSE_HEADERS

from .models import DEFAULT_SYSTEM_PROMPT, ChatPreferences, Conversation, Message
from .services import (context_usage, conversation_out, conversation_settings_out, message_out, reply_start,
                       reply_stream)

router = Router(auth=ChatAuth(), tags=["OptimaChat"])

DEFAULT_PAGE = 50
MAX_PAGE = 200


class ConversationNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "conversation_not_found"


def _user_id(request: HttpRequest) -> int:
    principal: Principal = request.auth
    if principal.user_id is None:
        raise PermissionDenied("Conversations belong to users: sign in (JWT) or use a key that a user owns.")
    return principal.user_id


def _int_param(request: HttpRequest, name: str, default: int, low: int, high: int) -> int:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a whole number.", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}.", param=name)
    return value


class ConversationIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    title: Annotated[str, Field(max_length=200)] = ""
    modelId: Annotated[str, Field(max_length=200)] = ""
    systemPrompt: Annotated[str, Field(max_length=100_000)] = DEFAULT_SYSTEM_PROMPT
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7


@database_sync_to_async
def _create(user_id: int, values: dict[str, Any]) -> dict[str, Any]:
    title = values.get("title", "").strip()
    conversation = Conversation.objects.create(
        user_id=user_id, title=title, model_id=values.get("modelId", ""),
        title_source=Conversation.TitleSource.USER if title else Conversation.TitleSource.FALLBACK,
        system_prompt=values.get("systemPrompt", DEFAULT_SYSTEM_PROMPT),
        temperature=values.get("temperature", 0.7))
    return conversation_out(conversation)


@router.post("", summary="Start a conversation (New Chat)")
async def conversations_create(request: HttpRequest) -> HttpResponse:
    user_id = _user_id(request)
    values = validated(ConversationIn, json_object(request))
    return JsonResponse(await _create(user_id, values), status=201)


@database_sync_to_async
def _page(user_id: int, start: int, count: int, search: str) -> tuple[int, list[dict[str, Any]]]:
    mine = Conversation.objects.filter(user_id=user_id)
    if search:
        matching = Message.objects.filter(conversation__user_id=user_id, content__icontains=search)
        mine = mine.filter(Q(title__icontains=search) | Q(pk__in=matching.values("conversation_id")))
    return mine.count(), [conversation_out(c) for c in mine.order_by("-updated_at")[start:start + count]]


@router.get("", summary="The caller's conversations, newest activity first, paged; `search` keeps those whose title "
            "or messages contain it")
async def conversations_list(request: HttpRequest) -> HttpResponse:
    user_id = _user_id(request)
    start = _int_param(request, "startIndex", 0, 0, 10**9)
    count = _int_param(request, "returnCount", DEFAULT_PAGE, 1, MAX_PAGE)
    search = request.GET.get("search", "").strip()
    if len(search) > 200:
        raise InvalidRequest("'search' takes at most 200 characters.", param="search")
    total, data = await _page(user_id, start, count, search)
    return JsonResponse({"object": "list", "data": data, "startIndex": start, "returnCount": len(data),
                         "total": total})


def _mine(user_id: int, conversation_id: str) -> Conversation:
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
def _get(user_id: int, conversation_id: str) -> dict[str, Any]:
    conversation = _mine(user_id, conversation_id)
    return {**conversation_settings_out(conversation),
            "messages": [message_out(m) for m in conversation.messages.all()]}


@router.get("/{conversation_id}", summary="One conversation with its messages")
async def conversations_get(request: HttpRequest, conversation_id: str) -> HttpResponse:
    return JsonResponse(await _get(_user_id(request), conversation_id))


class ChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    title: Annotated[str, Field(max_length=200)] | None = None
    modelId: Annotated[str, Field(max_length=200)] | None = None
    systemPrompt: Annotated[str, Field(max_length=100_000)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None


@database_sync_to_async
def _change(user_id: int, conversation_id: str, values: dict[str, Any]) -> dict[str, Any]:
    conversation = _mine(user_id, conversation_id)
    fields = {"title": "title", "modelId": "model_id", "systemPrompt": "system_prompt", "temperature": "temperature"}
    for name, value in values.items():
        setattr(conversation, fields[name], value)
    if "title" in values:
        conversation.title_source = Conversation.TitleSource.USER
    conversation.save(update_fields=[fields[name] for name in values]
                      + (["title_source"] if "title" in values else []) + ["updated_at"])
    return conversation_settings_out(conversation)


@router.patch("/{conversation_id}", summary="Rename a conversation or change its settings (system prompt, "
              "temperature, model), which apply from the next message")
async def conversations_change(request: HttpRequest, conversation_id: str) -> HttpResponse:
    user_id = _user_id(request)
    values = {k: v for k, v in validated(ChangeIn, json_object(request)).items() if v is not None}
    if not values:
        raise InvalidRequest("Send at least one of 'title', 'systemPrompt', 'temperature', 'modelId'.")
    if "title" in values:
        values["title"] = values["title"].strip()
        if not values["title"]:
            raise InvalidRequest("A title needs at least one visible character.", param="title")
    return JsonResponse(await _change(user_id, conversation_id, values))


@database_sync_to_async
def _delete(user_id: int, conversation_id: str) -> None:
    _mine(user_id, conversation_id).delete()


@router.delete("/{conversation_id}", summary="Delete a conversation and its messages")
async def conversations_delete(request: HttpRequest, conversation_id: str) -> HttpResponse:
    await _delete(_user_id(request), conversation_id)
    return JsonResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


class SendIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    content: Annotated[str, Field(max_length=100_000)] = ""
    modelId: Annotated[str, Field(max_length=200)] = ""
    regenerate: bool = False


@database_sync_to_async
def _mine_async(user_id: int, conversation_id: str) -> Conversation:
    return _mine(user_id, conversation_id)


@router.post("/{conversation_id}/messages",
             summary="Send a message (or regenerate the last reply) and stream the reply as server-sent events")
async def conversations_send(request: HttpRequest, conversation_id: str) -> HttpResponse:
    user_id = _user_id(request)
    values = validated(SendIn, json_object(request))
    content, regenerate = values.get("content", ""), values.get("regenerate", False)
    if regenerate == bool(content.strip()):
        raise InvalidRequest("Send either some 'content' or 'regenerate': true.", param="content")
    conversation = await _mine_async(user_id, conversation_id)
    model_id = values.get("modelId") or conversation.model_id
    if not model_id:
        raise InvalidRequest("Choose a model for this conversation ('modelId').", param="modelId")
    call, events, first = await reply_start(principal=request.auth, conversation=conversation, content=content,
                                            model_id=model_id, regenerate=regenerate)
    return StreamingHttpResponse(reply_stream(conversation, model_id, call, events, first),
                                 content_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/{conversation_id}/context",
            summary="How many tokens System, Tools, User and AI take of the model's context window, by its tokenizer")
async def conversations_context(request: HttpRequest, conversation_id: str) -> HttpResponse:
    user_id = _user_id(request)
    conversation = await _mine_async(user_id, conversation_id)
    model_id = request.GET.get("modelId") or conversation.model_id
    if not model_id:
        raise InvalidRequest("Choose a model to count with ('modelId').", param="modelId")
    return JsonResponse(await context_usage(request.auth, conversation, model_id))


preferences_router = Router(auth=ChatAuth(), tags=["OptimaChat"])


class PreferencesIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    expandBlocks: bool


@database_sync_to_async
def _preferences(user_id: int, values: dict[str, Any]) -> dict[str, Any]:
    preferences, _ = ChatPreferences.objects.get_or_create(user_id=user_id)
    if values:
        preferences.expand_blocks = values["expandBlocks"]
        preferences.save()
    return {"expandBlocks": preferences.expand_blocks}


@preferences_router.get("", summary="The caller's own OptimaChat settings")
async def preferences_get(request: HttpRequest) -> HttpResponse:
    return JsonResponse(await _preferences(_user_id(request), {}))


@preferences_router.patch("", summary="Change the caller's own OptimaChat settings")
async def preferences_change(request: HttpRequest) -> HttpResponse:
    user_id = _user_id(request)
    return JsonResponse(await _preferences(user_id, validated(PreferencesIn, json_object(request))))
