"""/optima/v1/conversations: a user's OptimaChat conversations, for JWT clients.

A conversation belongs to one user: every query here is filtered by the caller, and another user's
conversation is answered 404, exactly like one that does not exist. A key without an owner has no
conversations (403).
"""

from __future__ import annotations

from typing import Annotated, Literal

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from ninja import Router
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import ChatAuth
from gateway.principal import AuthedRequest
from gateway.sse import SSE_HEADERS, sse_frames
from mcp_servers.runtime import chat_tools
from optimagpt.errors import ERRORS, InvalidRequest, PermissionDenied

from .conversations import (
    conversation_change,
    conversation_create,
    conversation_delete,
    conversation_of_async,
    conversation_with_messages,
    conversations_page,
    preferences_update,
)
from .models import DEFAULT_SYSTEM_PROMPT
from .services import context_usage, reply_events, reply_start

router = Router(auth=ChatAuth(), tags=["OptimaChat"])

DEFAULT_PAGE = 50
MAX_PAGE = 200


def _user_id(request: AuthedRequest) -> int:
    principal = request.auth
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


# -- answers' shapes (for /docs; built as dicts by chat/services.py, not validated on the way out) ---------
class ConversationOut(BaseModel):
    id: str
    userId: int
    title: str
    titleSource: Literal["fallback", "model", "user"]
    modelId: str
    turnCount: int
    status: str
    createdAt: str
    updatedAt: str


class ConversationListOut(BaseModel):
    object: Literal["list"]
    data: list[ConversationOut]
    startIndex: int
    returnCount: int
    total: int


class ConversationSettingsOut(ConversationOut):
    systemPrompt: str
    temperature: float
    mcpTools: list[str] = Field(description="MCP servers (all their tools) or tools (<server>_<tool>) it uses")


class ToolCallOut(BaseModel):
    id: str
    round: int
    server_label: str
    name: str
    arguments: str
    output: str
    error: bool
    duration_ms: float


class MessageOut(BaseModel):
    id: int
    role: Literal["system", "user", "assistant"]
    content: str
    status: str
    modelId: str
    createdAt: str
    error: str | None = Field(None, description="why the reply ended early, when it did")
    toolCalls: list[ToolCallOut] | None = Field(None, description="the MCP tool calls made for this reply")


class ConversationWithMessagesOut(ConversationSettingsOut):
    messages: list[MessageOut]


class ConversationDeletedOut(BaseModel):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


class ContextOut(BaseModel):
    modelId: str
    window: int | None
    system: int
    tools: int
    user: int
    assistant: int
    template: int
    used: int
    free: int | None
    countedWith: Literal["tokenizer", "estimate"]


class PreferencesOut(BaseModel):
    expandBlocks: bool


class ConversationIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    title: Annotated[str, Field(max_length=200)] = ""
    modelId: Annotated[str, Field(max_length=200)] = ""
    systemPrompt: Annotated[str, Field(max_length=100_000)] = DEFAULT_SYSTEM_PROMPT
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7


@router.post("", summary="Start a conversation (New Chat)",
             response={201: ConversationOut, **ERRORS})
async def conversations_create(request: AuthedRequest, body: ConversationIn) -> HttpResponse:
    user_id = _user_id(request)
    values = body.model_dump(exclude_unset=True)
    return JsonResponse(await conversation_create(user_id, values), status=201)


@router.get("", summary="The caller's conversations, newest activity first, paged; `search` keeps those whose title "
            "or messages contain it",
            response={200: ConversationListOut, **ERRORS})
async def conversations_list(request: AuthedRequest) -> HttpResponse:
    user_id = _user_id(request)
    start = _int_param(request, "startIndex", 0, 0, 10**9)
    count = _int_param(request, "returnCount", DEFAULT_PAGE, 1, MAX_PAGE)
    search = request.GET.get("search", "").strip()
    if len(search) > 200:
        raise InvalidRequest("'search' takes at most 200 characters.", param="search")
    total, data = await conversations_page(user_id, start, count, search)
    return JsonResponse({"object": "list", "data": data, "startIndex": start, "returnCount": len(data),
                         "total": total})


@router.get("/{conversation_id}", summary="One conversation with its messages",
            response={200: ConversationWithMessagesOut, **ERRORS})
async def conversations_get(request: AuthedRequest, conversation_id: str) -> HttpResponse:
    return JsonResponse(await conversation_with_messages(_user_id(request), conversation_id))


class ChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    title: Annotated[str, Field(max_length=200)] | None = None
    modelId: Annotated[str, Field(max_length=200)] | None = None
    systemPrompt: Annotated[str, Field(max_length=100_000)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    mcpTools: Annotated[list[Annotated[str, Field(min_length=1, max_length=100)]], Field(max_length=64)] | None = None


@router.patch("/{conversation_id}", summary="Rename a conversation or change its settings (system prompt, "
              "temperature, model, MCP tools), which apply from the next message",
              response={200: ConversationSettingsOut, **ERRORS})
async def conversations_change(request: AuthedRequest, conversation_id: str, body: ChangeIn) -> HttpResponse:
    user_id = _user_id(request)
    values = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    if not values:
        raise InvalidRequest("Send at least one of 'title', 'systemPrompt', 'temperature', 'modelId', 'mcpTools'.")
    if "title" in values:
        values["title"] = values["title"].strip()
        if not values["title"]:
            raise InvalidRequest("A title needs at least one visible character.", param="title")
    return JsonResponse(await conversation_change(user_id, conversation_id, values))


@router.delete("/{conversation_id}", summary="Delete a conversation and its messages",
               response={200: ConversationDeletedOut, **ERRORS})
async def conversations_delete(request: AuthedRequest, conversation_id: str) -> HttpResponse:
    await conversation_delete(_user_id(request), conversation_id)
    return JsonResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


class SendIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    content: Annotated[str, Field(max_length=100_000)] = ""
    modelId: Annotated[str, Field(max_length=200)] = ""
    regenerate: bool = False


@router.post("/{conversation_id}/messages",
             summary="Send a message (or regenerate the last reply) and stream the reply as server-sent events",
             response=ERRORS)
async def conversations_send(request: AuthedRequest, conversation_id: str, body: SendIn) -> HttpResponseBase:
    user_id = _user_id(request)
    values = body.model_dump(exclude_unset=True)
    content, regenerate = values.get("content", ""), values.get("regenerate", False)
    if regenerate == bool(content.strip()):
        raise InvalidRequest("Send either some 'content' or 'regenerate': true.", param="content")
    conversation = await conversation_of_async(user_id, conversation_id)
    model_id = values.get("modelId") or conversation.model_id
    if not model_id:
        raise InvalidRequest("Choose a model for this conversation ('modelId').", param="modelId")
    call, events, first = await reply_start(principal=request.auth, conversation=conversation, content=content,
                                            model_id=model_id, regenerate=regenerate)
    return StreamingHttpResponse(sse_frames(reply_events(conversation, model_id, call, events, first)),
                                 content_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/{conversation_id}/context",
            summary="How many tokens System, Tools, User and AI take of the model's context window, by its tokenizer",
            response={200: ContextOut, **ERRORS})
async def conversations_context(request: AuthedRequest, conversation_id: str) -> HttpResponse:
    user_id = _user_id(request)
    conversation = await conversation_of_async(user_id, conversation_id)
    model_id = request.GET.get("modelId") or conversation.model_id
    if not model_id:
        raise InvalidRequest("Choose a model to count with ('modelId').", param="modelId")
    return JsonResponse(await context_usage(request.auth, conversation, model_id))


preferences_router = Router(auth=ChatAuth(), tags=["OptimaChat"])


class PreferencesIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    expandBlocks: bool


@preferences_router.get("", summary="The caller's own OptimaChat settings",
                        response={200: PreferencesOut, **ERRORS})
async def preferences_get(request: AuthedRequest) -> HttpResponse:
    return JsonResponse(await preferences_update(_user_id(request), {}))


@preferences_router.patch("", summary="Change the caller's own OptimaChat settings",
                          response={200: PreferencesOut, **ERRORS})
async def preferences_change(request: AuthedRequest, body: PreferencesIn) -> HttpResponse:
    user_id = _user_id(request)
    return JsonResponse(await preferences_update(user_id, body.model_dump()))


chat_tools_router = Router(auth=ChatAuth(), tags=["OptimaChat"])


class ChatToolOut(BaseModel):
    name: str = Field(description="as the model sees it: <server>_<tool>")
    tool: str
    description: str


class ChatToolServerOut(BaseModel):
    server: str
    tools: list[ChatToolOut]


class ChatToolsOut(BaseModel):
    object: Literal["list"]
    data: list[ChatToolServerOut]


@chat_tools_router.get("", summary="The MCP servers (Chat on, connected) and tools a conversation may use",
                       response={200: ChatToolsOut, **ERRORS})
async def chat_tools_list(request: AuthedRequest) -> HttpResponse:
    _user_id(request)
    return JsonResponse({"object": "list", "data": await chat_tools()})
