"""/optima/v1/conversations: a user's OptimaChat conversations, for JWT clients.

A conversation belongs to one user: every query here is filtered by the caller, and another user's
conversation is answered 404, exactly like one that does not exist. A key without an owner has no
conversations (403).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from ninja import Router
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import ApiKeyAuth, Principal
from accounts.models import User
from gateway.errors import ApiError, InvalidRequest, PermissionDenied
from gateway.optima import json_object, validated

from .models import DEFAULT_SYSTEM_PROMPT, Conversation, Message
from .services import reply_start, reply_stream



class ChatAuth(ApiKeyAuth):
    """A JWT of a user with the Chat permission (OptimaChat's users need not hold Access Gateway), or an
    API key as on the rest of the API."""

    jwt_refusal = "You may not use OptimaChat: you lack the Chat permission."

    async def jwt_allows(self, user: User, gateway_ok: bool) -> bool:
        return await database_sync_to_async(user.has_perm)("accounts.chat")


router = Router(auth=ChatAuth(), tags=["OptimaChat"])

DEFAULT_PAGE = 50
MAX_PAGE = 200


class ConversationNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "conversation_not_found"


def conversation_out(c: Conversation) -> dict[str, Any]:
    return {"id": str(c.id), "userId": c.user_id, "title": c.title, "modelId": c.model_id,
            "turnCount": c.turn_count, "status": c.get_status_display(),
            "createdAt": c.created_at.isoformat(), "updatedAt": c.updated_at.isoformat()}


def message_out(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"id": m.pk, "role": m.role, "content": m.content, "status": m.status,
                           "modelId": m.model_id, "createdAt": m.created_at.isoformat()}
    if m.error:
        out["error"] = m.error
    return out


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
    conversation = Conversation.objects.create(
        user_id=user_id, title=values.get("title", "").strip(), model_id=values.get("modelId", ""),
        system_prompt=values.get("systemPrompt", DEFAULT_SYSTEM_PROMPT),
        temperature=values.get("temperature", 0.7))
    return conversation_out(conversation)


@router.post("", summary="Start a conversation (New Chat)")
async def conversations_create(request: HttpRequest) -> HttpResponse:
    user_id = _user_id(request)
    values = validated(ConversationIn, json_object(request))
    return JsonResponse(await _create(user_id, values), status=201)


@database_sync_to_async
def _page(user_id: int, start: int, count: int) -> tuple[int, list[dict[str, Any]]]:
    mine = Conversation.objects.filter(user_id=user_id)
    return mine.count(), [conversation_out(c) for c in mine.order_by("-updated_at")[start:start + count]]


@router.get("", summary="The caller's conversations, newest activity first, paged")
async def conversations_list(request: HttpRequest) -> HttpResponse:
    user_id = _user_id(request)
    start = _int_param(request, "startIndex", 0, 0, 10**9)
    count = _int_param(request, "returnCount", DEFAULT_PAGE, 1, MAX_PAGE)
    total, data = await _page(user_id, start, count)
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
    return {**conversation_out(conversation), "systemPrompt": conversation.system_prompt,
            "temperature": conversation.temperature,
            "messages": [message_out(m) for m in conversation.messages.all()]}


@router.get("/{conversation_id}", summary="One conversation with its messages")
async def conversations_get(request: HttpRequest, conversation_id: str) -> HttpResponse:
    return JsonResponse(await _get(_user_id(request), conversation_id))


class RenameIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    title: Annotated[str, Field(min_length=1, max_length=200)]


@database_sync_to_async
def _rename(user_id: int, conversation_id: str, title: str) -> dict[str, Any]:
    conversation = _mine(user_id, conversation_id)
    conversation.title = title
    conversation.save(update_fields=["title", "updated_at"])
    return conversation_out(conversation)


@router.patch("/{conversation_id}", summary="Rename a conversation")
async def conversations_rename(request: HttpRequest, conversation_id: str) -> HttpResponse:
    user_id = _user_id(request)
    values = validated(RenameIn, json_object(request))
    title = values["title"].strip()
    if not title:
        raise InvalidRequest("A title needs at least one visible character.", param="title")
    return JsonResponse(await _rename(user_id, conversation_id, title))


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
                                 content_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
