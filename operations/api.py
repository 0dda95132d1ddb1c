"""GET /optima/v1/requests: the request log's latest entries, for admins with Settings Access (as OllaBridge's
/admin/recent)."""

from __future__ import annotations

from channels.db import database_sync_to_async
from django.http import HttpResponse, JsonResponse
from ninja import Query, Router, Schema
from pydantic import Field

from gateway.auth import SettingsAuth
from gateway.principal import AuthedRequest
from optimagpt.errors import ERRORS

from .requestlog import entry_out
from .views import requests_filtered

router = Router(auth=SettingsAuth(), tags=["OptimaGPT"])


class RequestsQuery(Schema):
    limit: int = Field(100, ge=1, le=1000, description="how many, newest first")
    model: str = ""
    operation: str = Field("", description="chat.completions, completions, embeddings, responses, models, ...")
    status: str = Field("", description="an HTTP status, 2xx/4xx/5xx, or `error` (those with an error code)")
    who: str = Field("", description="an API key's prefix, or a username")
    client: str = Field("", description="a client address")


class RequestLogEntryOut(Schema):
    at: str
    key_prefix: str | None
    user: str | None
    client: str
    method: str
    path: str
    operation: str
    model: str | None
    stream: bool
    status: int
    error_code: str | None
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    node: str | None


class RequestLogOut(Schema):
    object: str = "list"
    data: list[RequestLogEntryOut]


@database_sync_to_async
def _recent(query: RequestsQuery) -> list[dict[str, object]]:
    rows = requests_filtered(query.model_dump())
    return [entry_out(e) for e in rows.order_by("-at", "-pk")[: query.limit]]


@router.get("", summary="The latest API requests (request log)", response={200: RequestLogOut, **ERRORS})
async def requests_recent(request: AuthedRequest, query: Query[RequestsQuery]) -> HttpResponse:
    return JsonResponse({"object": "list", "data": await _recent(query)})
