"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Endpoints are thin: validate the body, hand it to a node through
gateway/dispatch.py, and shape the node's events into OpenAI's objects.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from ninja import Router

from node_agent.protocol import OP_COMPLETION, OP_EMBEDDING
from nodes.models import Executor
from operations.record import note_error
from optimagpt.errors import ERRORS, ApiError, ModelNotFound

from .auth import ApiKeyAuth
from .dispatch import Streamed, first_event, inference_start
from .mcp_rounds import McpRounds, chat_start
from .principal import AuthedRequest
from .schemas import (
    ChatCompletionIn,
    ChatCompletionOut,
    CompletionIn,
    CompletionOut,
    EmbeddingIn,
    EmbeddingListOut,
    ModelListOut,
    ModelOut,
)
from .sse import SSE_HEADERS, sse

router = Router(auth=ApiKeyAuth(), tags=["OpenAI"])

def _node_body(request: HttpRequest) -> str:
    """The validated body as the client sent it, unknown fields included: no re-encoding on the way."""
    return request.body.decode()


async def _collect(call: Streamed) -> dict[str, Any]:
    """The `end` event of a request that is not streamed; the request is cancelled if we leave early."""
    try:
        event: dict[str, Any] = {}
        async for event in call.events():  # noqa: B007 - the last event, `end`, is the answer
            pass
        return event
    finally:
        await call.close()


async def _stream(events: AsyncGenerator[dict[str, Any], None], first: dict[str, Any], chunk: Any,
                  usage_head: dict[str, Any] | None) -> AsyncIterator[bytes]:
    """SSE as OpenAI sends it; a failure after the first byte becomes an error event and no [DONE].

    With `usage_head` (stream_options.include_usage), a last chunk with no choices carries the usage.
    """
    try:
        event: dict[str, Any] | None = first
        while event is not None:
            yield sse(chunk(event))
            if event["type"] == "end":
                if usage_head is not None:
                    yield sse({**usage_head, "choices": [], "usage": event["usage"]})
                yield b"data: [DONE]\n\n"
                return
            event = await anext(events, None)
    except ApiError as exc:
        note_error(exc.code)
        yield sse(exc.body())
    finally:
        await events.aclose()


def _choices(end: dict[str, Any]) -> list[dict[str, Any]]:
    """The choices an `end` event closes: several when n > 1, else the one the event itself describes."""
    return end.get("choices") or [{**end, "index": 0}]


def _finish_reason(event: dict[str, Any]) -> str:
    reason = event.get("finish_reason") or "stop"
    return "stop" if reason == "cancelled" else reason


# -- chat ---------------------------------------------------------------------
@router.post("/chat/completions", summary="Create a chat completion", response={200: ChatCompletionOut, **ERRORS})
async def chat_completions(request: AuthedRequest, body: ChatCompletionIn) -> HttpResponseBase:
    call = await chat_start(principal=request.auth, body=body, body_json=_node_body(request))
    completion_id = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    if not body.stream:
        event = await _collect(call)
        return JsonResponse({
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "system_fingerprint": None,
            "choices": [{"index": c["index"], "message": c["message"], "logprobs": None,
                         "finish_reason": _finish_reason(c)} for c in _choices(event)],
            "usage": event["usage"],
            **({"mcp_calls": event["mcp_calls"]} if "mcp_calls" in event else {}),
        }, headers={"Server-Timing": call.server_timing()} if isinstance(call, McpRounds) else None)

    events, first = await first_event(call)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "system_fingerprint": None}
    usage_field = {"usage": None} if include_usage else {}
    role_sent: set[int] = set()

    def chunk(event: dict[str, Any]) -> dict[str, Any]:
        if event["type"] == "end":
            return {**head, "choices": [{"index": c["index"], "delta": {}, "logprobs": None,
                                         "finish_reason": _finish_reason(c)} for c in _choices(event)], **usage_field}
        index = event.get("index", 0)
        delta = event["delta"]
        if index not in role_sent:
            delta = {"role": "assistant", **({"content": None} if "tool_calls" in delta else {}), **delta}
            role_sent.add(index)
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        if "mcp_calls" in event:  # what the gateway ran in the round that just ended (gateway/mcp_rounds.py)
            return {**head, "choices": [choice], **usage_field, "mcp_calls": event["mcp_calls"]}
        return {**head, "choices": [choice], **usage_field}

    return StreamingHttpResponse(_stream(events, first, chunk, head if include_usage else None),
                                 content_type="text/event-stream", headers=SSE_HEADERS)


# -- legacy completions -------------------------------------------------------
@router.post("/completions", summary="Create a completion (legacy)", response={200: CompletionOut, **ERRORS})
async def completions(request: AuthedRequest, body: CompletionIn) -> HttpResponseBase:
    call = await inference_start(principal=request.auth, model=body.model, op=OP_COMPLETION,
                                 body_json=_node_body(request), stream=body.stream)
    completion_id = "cmpl-" + uuid.uuid4().hex
    created = int(time.time())
    head = {"id": completion_id, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": None}
    if not body.stream:
        event = await _collect(call)
        return JsonResponse({**head, "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                                                  "finish_reason": _finish_reason(c)} for c in _choices(event)],
                             "usage": event["usage"]})
    events, first = await first_event(call)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(event: dict[str, Any]) -> dict[str, Any]:
        if event["type"] == "end":
            return {**head, "choices": [{"index": c["index"], "text": "", "logprobs": None,
                                         "finish_reason": _finish_reason(c)} for c in _choices(event)]}
        return {**head, "choices": [{"index": event.get("index", 0), "text": event["text"], "logprobs": None,
                                     "finish_reason": None}]}

    return StreamingHttpResponse(_stream(events, first, chunk, head if include_usage else None),
                                 content_type="text/event-stream", headers=SSE_HEADERS)


# -- embeddings ---------------------------------------------------------------
@router.post("/embeddings", summary="Create embeddings", response={200: EmbeddingListOut, **ERRORS})
async def embeddings(request: AuthedRequest, body: EmbeddingIn) -> HttpResponse:
    call = await inference_start(principal=request.auth, model=body.model, op=OP_EMBEDDING,
                                 body_json=_node_body(request), stream=False)
    event = await _collect(call)
    vectors = event["embeddings"]
    if body.dimensions is not None and body.dimensions != len(vectors[0]):
        raise ApiError(f"This model makes embeddings of {len(vectors[0])} dimensions; "
                       f"dimensions={body.dimensions} is not supported.", param="dimensions")
    data = [
        {"object": "embedding", "index": i,
         "embedding": _b64_floats(v) if body.encoding_format == "base64" else v}
        for i, v in enumerate(vectors)
    ]
    return JsonResponse({"object": "list", "data": data, "model": body.model, "usage": event["usage"]})


def _b64_floats(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# -- models -------------------------------------------------------------------
def _model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "optimagpt"}


@database_sync_to_async
def _served_models() -> dict[str, int]:
    """Model ids a connected node serves now, with when each was first seen."""
    served: dict[str, int] = {}
    rows = Executor.objects.ready().values_list("model_id", "node__created_at", "updated_at")
    for model_id, node_created, updated in rows:
        stamp = int((node_created or updated).timestamp())  # a remote upstream has no node
        served[model_id] = min(stamp, served.get(model_id, stamp))
    return served


@router.get("/models", summary="List the models that can be served now", response={200: ModelListOut, **ERRORS})
async def list_models(request: AuthedRequest) -> HttpResponse:
    served = await _served_models()
    return JsonResponse({"object": "list", "data": [_model_object(m, c) for m, c in sorted(served.items())
                                                    if request.auth.allows_model(m)]})


@router.get("/models/{path:model_id}", summary="Retrieve a model", response={200: ModelOut, **ERRORS})
async def retrieve_model(request: AuthedRequest, model_id: str) -> HttpResponse:
    served = await _served_models()
    if model_id not in served or not request.auth.allows_model(model_id):
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return JsonResponse(_model_object(model_id, served[model_id]))
