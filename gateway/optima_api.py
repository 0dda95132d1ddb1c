"""OptimaGPT's own API under /optima/v1: models by kind, capabilities, and executor management.

Same credentials as /v1 (API key or JWT). Managing executors also needs the
owner's Executor Management permission. Errors use OpenAI's `{"error": {...}}` body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import Body, Router
from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from accounts.ratelimit import authentication_failed
from node_agent.protocol import MODEL_ID_MAX_LENGTH, MODEL_ID_PATTERN
from nodes.enrollment import EnrollmentRefused, node_enroll
from nodes.models import Executor, Node
from optimagpt.addresses import client_address
from optimagpt.bodies import validated
from optimagpt.errors import ERRORS, ApiError, AuthenticationFailed, ModelNotFound, PermissionDenied

from .auth import ApiKeyAuth, ManagementAuth, ModelListAuth
from .executors import executor_configure, executor_delete, executor_remote_create
from .principal import AuthedRequest, Principal
from .routing.router import strategy as routing_strategy

router = Router(auth=ApiKeyAuth(), tags=["OptimaGPT"])

ModelId = Annotated[str, Field(min_length=1, max_length=MODEL_ID_MAX_LENGTH, pattern=MODEL_ID_PATTERN)]


# -- answers' shapes (for /docs; built as dicts, not validated on the way out) --------------------------
class ChatModelOut(BaseModel):
    id: str
    name: str
    owned_by: str
    ctx_max: int | None = Field(description="the smallest context window among the executors serving it")
    description: str


class EmbedModelOut(BaseModel):
    id: str
    name: str
    owned_by: str
    dimensions: int | None
    description: str


class OptimaModelsOut(BaseModel):
    object: Literal["list"]
    chat_models: list[ChatModelOut]
    embed_models: list[EmbedModelOut]


class CapabilitiesOut(BaseModel):
    canChat: bool  # noqa: N815 - the reference API's names
    canEmbed: bool  # noqa: N815
    numNodes: int  # noqa: N815
    routing: Literal["least_busy", "round_robin"]


class ExecutorNodeOut(BaseModel):
    id: int
    name: str
    connected: bool


class ExecutorOut(BaseModel):
    """A model file on a node (`kind` "chat" or "embedding") or a remote upstream ("remote"); each has its own
    fields besides the common ones."""

    id: int
    kind: Literal["chat", "embedding", "remote"]
    node: ExecutorNodeOut | None
    key: str
    model_id: str
    name: str
    description: str
    state: str
    error: str
    enabled: bool
    embedding: bool
    # a remote upstream's (its key itself is never shown)
    base_url: str | None = None
    upstream_model: str | None = None
    has_api_key: bool | None = None
    # a model file's
    family: str | None = None
    architecture: str | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    embedding_length: int | None = None
    n_ctx: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    valid: bool | None = None
    replicas: int | None = None
    replicas_online: int | None = None
    parallel: int | None = None
    settings: dict[str, Any] | None = None


class ExecutorListOut(BaseModel):
    object: Literal["list"]
    data: list[ExecutorOut]


class NotReady(ApiError):
    status = 503
    type = "server_error"
    code = "not_ready"


# -- models and capabilities -----------------------------------------------------
@database_sync_to_async
def _ready_rows() -> list[Mapping[str, Any]]:
    return list(Executor.objects.ready().values("model_id", "name", "embedding", "n_ctx", "embedding_length",
                                                "description", "node_id", "base_url"))


def _owner(row: Mapping[str, Any]) -> str:
    if row["node_id"] is None:
        return urlsplit(row["base_url"]).hostname or "remote"
    return "optimagpt"


@router.get("/models", auth=ModelListAuth(),
            summary="Models that can be served now, chat and embedding apart (also for OptimaChat's users)",
            response={200: OptimaModelsOut, **ERRORS})
async def optima_models(request: AuthedRequest) -> HttpResponse:
    chat: dict[str, dict[str, Any]] = {}
    embed: dict[str, dict[str, Any]] = {}
    for row in await _ready_rows():
        model_id = row["model_id"]
        if not request.auth.allows_model(model_id):
            continue
        if row["embedding"]:
            entry = embed.setdefault(model_id, {"id": model_id, "name": row["name"] or model_id,
                                                "owned_by": _owner(row), "dimensions": None,
                                                "description": row["description"]})
            entry["dimensions"] = entry["dimensions"] or row["embedding_length"] or None
        else:
            entry = chat.setdefault(model_id, {"id": model_id, "name": row["name"] or model_id,
                                               "owned_by": _owner(row), "ctx_max": None,
                                               "description": row["description"]})
            # Any of the executors may take a request: the window a client can count on is the smallest.
            if row["n_ctx"]:
                entry["ctx_max"] = min(entry["ctx_max"] or row["n_ctx"], row["n_ctx"])
        entry["description"] = entry["description"] or row["description"]
    return JsonResponse({"object": "list", "chat_models": sorted(chat.values(), key=lambda m: m["id"]),
                         "embed_models": sorted(embed.values(), key=lambda m: m["id"])})


@database_sync_to_async
def _capabilities() -> dict[str, Any]:
    ready = Executor.objects.ready()
    live_nodes = Node.objects.filter(connected=True, activated=True, last_seen__gte=Node.live_cutoff())
    return {
        "canChat": ready.filter(embedding=False).exists(),
        # Local chat models make embeddings too (a second context on the same weights).
        "canEmbed": ready.filter(embedding=True).exists() or ready.filter(node__isnull=False).exists(),
        "numNodes": live_nodes.count(),
        "routing": routing_strategy(),
    }


@router.get("/capabilities", summary="What the gateway can do now; 503 while no model can be served",
            response={200: CapabilitiesOut, **ERRORS})
async def optima_capabilities(request: AuthedRequest) -> HttpResponse:
    capabilities = await _capabilities()
    if not (capabilities["canChat"] or capabilities["canEmbed"]):
        error = NotReady("No model can be served yet: no node is linked with a running model.")
        response = JsonResponse({**error.body(), **capabilities}, status=error.status)
        response["Retry-After"] = "5"
        return response
    return JsonResponse(capabilities)


# -- executors ------------------------------------------------------------------
def executor_out(e: Executor) -> dict[str, Any]:
    """An executor as the API and the pages show it; a remote upstream's key is never part of it."""
    out: dict[str, Any] = {
        "id": e.pk, "kind": e.kind,
        "node": ({"id": e.node.pk, "name": e.node.name, "connected": e.node.connected} if e.node else None),
        "key": e.key, "model_id": e.model_id, "name": e.name, "description": e.description, "state": e.state,
        "error": e.error, "enabled": e.enabled, "embedding": e.embedding,
    }
    if e.is_remote:
        out.update(base_url=_without_credentials(e.base_url), upstream_model=e.upstream_model,
                   has_api_key=bool(e.upstream_key_encrypted))
    else:
        out.update(family=e.family, architecture=e.architecture, parameter_count=e.parameter_count,
                   quantization=e.quantization, context_length=e.context_length,
                   embedding_length=e.embedding_length, n_ctx=e.n_ctx, size_bytes=e.size_bytes, sha256=e.sha256,
                   valid=e.valid, replicas=e.replicas, replicas_online=e.replicas_online, parallel=e.parallel,
                   settings=e.settings)
    return out


def _without_credentials(url: str) -> str:
    """A base URL as shown: credentials, refused since, are never echoed from rows saved before."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


_out = database_sync_to_async(executor_out)  # reads the node's name: a query


@database_sync_to_async
def _executor(principal: Principal, executor_id: int) -> Executor:
    """The executor, if it exists and the caller's key may touch its model (else: as if it did not exist)."""
    executor = Executor.objects.select_related("node").filter(pk=executor_id).first()
    if executor is None or not principal.allows_model(executor.model_id):
        raise ModelNotFound(f"No executor {executor_id}.", code="executor_not_found")
    return executor


def _require_model_allowed(principal: Principal, values: dict[str, Any]) -> None:
    if "model_id" in values and not principal.allows_model(values["model_id"]):
        raise PermissionDenied(f"This API key may not use the model '{values['model_id']}'.", param="model_id")


class RemoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=200)]
    model_id: ModelId
    base_url: HttpUrl
    upstream_model: Annotated[str, Field(max_length=200)] = ""
    api_key: Annotated[str, Field(max_length=4096)] = ""
    description: Annotated[str, Field(max_length=1000)] = ""
    embedding: bool = False
    enabled: bool = True


class RemoteUpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model_id: ModelId | None = None
    base_url: HttpUrl | None = None
    upstream_model: Annotated[str, Field(max_length=200)] | None = None
    api_key: Annotated[str, Field(max_length=4096)] | None = None
    description: Annotated[str, Field(max_length=1000)] | None = None
    embedding: bool | None = None
    enabled: bool | None = None


@router.get("/executors", auth=ManagementAuth(), summary="Every executor: models on nodes and remote upstreams",
            response={200: ExecutorListOut, **ERRORS})
async def executors_list(request: AuthedRequest) -> HttpResponse:
    rows = await database_sync_to_async(lambda: [executor_out(e) for e in Executor.objects.select_related("node")
                                                  if request.auth.allows_model(e.model_id)])()
    return JsonResponse({"object": "list", "data": rows})


@router.post("/executors", auth=ManagementAuth(), summary="Register a remote OpenAI-compatible upstream as an executor",
             response={201: ExecutorOut, **ERRORS})
async def executors_create_remote(request: AuthedRequest, body: RemoteIn) -> HttpResponse:
    values = body.model_dump(exclude_unset=True)
    values["base_url"] = str(body.base_url).rstrip("/")
    _require_model_allowed(request.auth, values)
    executor = await executor_remote_create(**values)
    return JsonResponse(await _out(executor), status=201)


@router.get("/executors/{executor_id}", auth=ManagementAuth(), summary="One executor",
            response={200: ExecutorOut, **ERRORS})
async def executors_get(request: AuthedRequest, executor_id: int) -> HttpResponse:
    return JsonResponse(await _out(await _executor(request.auth, executor_id)))


@router.patch("/executors/{executor_id}", auth=ManagementAuth(),
              summary="Change an executor's settings (applied by restarting it)",
              response={200: ExecutorOut, **ERRORS})
async def executors_update(request: AuthedRequest, executor_id: int,
                           changes: Body[dict[str, Any]]) -> HttpResponse:
    """A local executor's settings are checked by the node's own rules (ExecutorSettings); a remote one's here."""
    executor = await _executor(request.auth, executor_id)
    if executor.is_remote:
        changes = validated(RemoteUpdateIn, changes)
        if "base_url" in changes:
            changes["base_url"] = str(changes["base_url"]).rstrip("/")
        _require_model_allowed(request.auth, changes)
    return JsonResponse(await _out(await executor_configure(executor=executor, changes=changes)))


@router.post("/executors/{executor_id}/start", auth=ManagementAuth(), summary="Start an executor (and keep it enabled)",
             response={200: ExecutorOut, **ERRORS})
async def executors_start(request: AuthedRequest, executor_id: int) -> HttpResponse:
    executor = await executor_configure(executor=await _executor(request.auth, executor_id), changes={"enabled": True})
    return JsonResponse(await _out(executor))


@router.post("/executors/{executor_id}/stop", auth=ManagementAuth(), summary="Stop an executor and free its memory",
             response={200: ExecutorOut, **ERRORS})
async def executors_stop(request: AuthedRequest, executor_id: int) -> HttpResponse:
    executor = await executor_configure(executor=await _executor(request.auth, executor_id), changes={"enabled": False})
    return JsonResponse(await _out(executor))


@router.delete("/executors/{executor_id}", auth=ManagementAuth(), summary="Remove a remote upstream",
               response={204: None, **ERRORS})
async def executors_delete(request: AuthedRequest, executor_id: int) -> HttpResponse:
    await executor_delete(executor=await _executor(request.auth, executor_id))
    return HttpResponse(status=204)


# -- node enrollment (nodes/enrollment.py) ----------------------------------------------------------
class EnrollIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=200, description="the enrollment token an admin made (shown to them once)")
    node_id: str = Field(max_length=64, description="the node's own id (a UUID it made on first start)")
    name: str = Field("", max_length=100)


class EnrollOut(BaseModel):
    node_id: str
    credential: str = Field(description="the node's own secret for every later link; kept in its state folder")


@router.post("/nodes/enroll", auth=None, summary="Exchange an enrollment token for a node's credential",
             response={200: EnrollOut, **ERRORS})
async def nodes_enroll(request: HttpRequest, body: EnrollIn) -> HttpResponse:
    """What `python -m node_agent join` calls. No API key: the token is the credential. A refused token counts
    as a failed authentication of the address (429 past OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE)."""
    address = client_address(request)
    try:
        credential = await database_sync_to_async(node_enroll)(raw_token=body.token, node_id=body.node_id,
                                                               name=body.name, address=address)
    except EnrollmentRefused as exc:
        await authentication_failed(address)
        raise AuthenticationFailed(f"Enrollment refused: {exc}.", code="enrollment_refused") from None
    return JsonResponse({"node_id": body.node_id, "credential": credential})
