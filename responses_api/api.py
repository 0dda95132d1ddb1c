"""The Responses API: POST /v1/responses and the stored responses' endpoints (mounted in optimagpt/api.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from django.http import JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from ninja import Query, Router, Schema
from pydantic import Field

from gateway.auth import ApiKeyAuth
from gateway.principal import AuthedRequest
from gateway.routing.router import model_known
from gateway.sse import SSE_HEADERS, dumps
from optimagpt.errors import ERRORS, ApiError, ModelNotFound, PermissionDenied

from . import services
from .background import background_cancel, background_start, running
from .items import chat_request, chat_tools, echoed, new_id, response_object, stored_items
from .runner import ResponseRun
from .schemas import InputItemListOut, ResponseDeletedOut, ResponseIn, ResponseOut

router = Router(auth=ApiKeyAuth(), tags=["OpenAI"])


def _frame(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


async def _run_for(request: AuthedRequest, body: ResponseIn) -> ResponseRun:
    """The run that answers `body`: its chain loaded, its tools and input turned into a chat completion."""
    started = time.perf_counter()
    history = await services.history(request.auth, body.previous_response_id) if body.previous_response_id else []
    loaded_ms = (time.perf_counter() - started) * 1000
    own = stored_items(body.items())
    tools = chat_tools(body)
    chat = chat_request(body, history, own, tools, stream=body.stream or body.background)
    listed = {item["server_label"] for item in history if item.get("type") == "mcp_list_tools"}
    run = ResponseRun(principal=request.auth, response_id=new_id("resp"), model=body.model, chat=chat, tools=tools,
                      settings=echoed(body), own_items=own, listed_servers=listed, background=body.background,
                      previous_id=body.previous_response_id or "")
    run.history_ms = loaded_ms
    return run


@router.post("", summary="Create a model response", response={200: ResponseOut, **ERRORS})
async def create_response(request: AuthedRequest, body: ResponseIn) -> HttpResponseBase:
    run = await _run_for(request, body)
    if body.background:
        # Answered at once, so what would fail at once fails now: an unknown model, one the key may not use.
        if not await model_known(body.model):
            raise ModelNotFound(f"The model '{body.model}' does not exist.", param="model")
        if not request.auth.allows_model(body.model):
            raise PermissionDenied(f"This API key may not use the model '{body.model}'.", param="model",
                                   code="model_not_allowed")
        await services.response_create(run)
        job, queue = background_start(run, listen=body.stream)
        if queue is None:
            return JsonResponse(run.object(), headers=run.headers())
        return StreamingHttpResponse(_listen(run, queue), content_type="text/event-stream",
                                     headers={**SSE_HEADERS, **run.headers()})
    await run.prepare()
    if not body.stream:
        async for _ in run.events():
            pass
        if body.store:
            services.response_store(run)
        if run.failure is not None:
            raise run.failure
        return JsonResponse(run.object(), headers=run.headers())
    return StreamingHttpResponse(_stream(run, body.store), content_type="text/event-stream",
                                 headers={**SSE_HEADERS, **run.headers()})


async def _stream(run: ResponseRun, store: bool) -> AsyncIterator[bytes]:
    """The events as server-sent events (`event:` and `data:` lines, no [DONE]); stored when it ends, however."""
    events = run.events()
    try:
        async for event in events:
            yield _frame(event)
    finally:
        try:
            await events.aclose()
        finally:
            if store:
                services.response_store(run)  # also when the client left: what it got so far, cancelled


async def _listen(run: ResponseRun, queue: asyncio.Queue[dict[str, Any] | None]) -> AsyncIterator[bytes]:
    """A background response's events as they come; the client leaving does not stop it."""
    job = running(run.id)
    try:
        while True:
            event = await queue.get()
            if event is None:
                return
            yield _frame(event)
    finally:
        if job is not None and queue in job.listeners:
            job.listeners.remove(queue)


@router.get("/{response_id}", summary="Retrieve a stored model response", response={200: ResponseOut, **ERRORS})
async def retrieve_response(request: AuthedRequest, response_id: str) -> JsonResponse:
    return JsonResponse(response_object(await services.response_get(request.auth, response_id)))


@router.delete("/{response_id}", summary="Delete a stored model response",
               response={200: ResponseDeletedOut, **ERRORS})
async def delete_response(request: AuthedRequest, response_id: str) -> JsonResponse:
    if await services.response_delete(request.auth, response_id):
        background_cancel(response_id)
    return JsonResponse({"id": response_id, "object": "response", "deleted": True})


@router.post("/{response_id}/cancel", summary="Cancel a background response", response={200: ResponseOut, **ERRORS})
async def cancel_response(request: AuthedRequest, response_id: str) -> JsonResponse:
    snapshot = await services.response_cancel(request.auth, response_id)
    job = running(response_id)
    if job is not None and background_cancel(response_id) and job.task is not None:
        # Here: wait (briefly) for it to stop, so that the answer shows the output it got to.
        await asyncio.wait([job.task], timeout=5)
        snapshot = await services.response_get(request.auth, response_id)
    return JsonResponse(response_object(snapshot))


class InputItemsQuery(Schema):
    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
    before: str | None = None


@router.get("/{response_id}/input_items", summary="List a stored response's input items",
            response={200: InputItemListOut, **ERRORS})
async def list_input_items(request: AuthedRequest, response_id: str,
                           query: Query[InputItemsQuery]) -> JsonResponse:
    items = await services.response_input_items(request.auth, response_id)
    if query.order == "desc":
        items.reverse()
    ids = [item["id"] for item in items]
    for cursor, name in ((query.after, "after"), (query.before, "before")):
        if cursor is not None and cursor not in ids:
            raise ApiError(f"No input item with id '{cursor}' in response '{response_id}'.", param=name)
    start = ids.index(query.after) + 1 if query.after is not None else 0
    end = ids.index(query.before) if query.before is not None else len(items)
    page = items[start:end][: query.limit]
    return JsonResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None,
                         "has_more": start + len(page) < end})
