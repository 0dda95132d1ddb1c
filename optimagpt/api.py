"""The django-ninja API: mounts the routers and maps every error to OpenAI's `{"error": {...}}` body."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.views.defaults import page_not_found
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from accounts.api import router as auth_router
from chat.api import chat_tools_router, preferences_router
from chat.api import router as conversations_router
from gateway.api import chat_completions, completions, embeddings
from gateway.api import router as openai_router
from gateway.optima_api import router as optima_router
from gateway.schemas import ChatCompletionIn, CompletionIn, EmbeddingIn
from operations.api import router as operations_router
from operations.record import note_error
from optimagpt.errors import ApiError, error_body
from responses_api.api import router as responses_router

log = logging.getLogger("optimagpt.api")

api = NinjaAPI(title="OptimaGPT", version="1", description="OpenAI-compatible API of the OptimaGPT gateway",
               urls_namespace="api")
api.add_router("/v1", openai_router)
api.add_router("/v1/responses", responses_router)
optima_router.add_router("/conversations", conversations_router)
optima_router.add_router("/preferences", preferences_router)
optima_router.add_router("/chat/tools", chat_tools_router)
optima_router.add_router("/requests", operations_router)
api.add_router("/optima/v1", optima_router)
api.add_router("/api/auth", auth_router)


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JsonResponse:
    return JsonResponse(error_body(message, type=type, param=param, code=code), status=status)


@api.exception_handler(ApiError)
def on_api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    note_error(exc.code)
    response = JsonResponse(exc.body(), status=exc.status)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


@api.exception_handler(ValidationError)
def on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    first = exc.errors[0] if exc.errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "payload", "query", "path")]
    # Union types report one error per branch; the first says enough, with where it is.
    param = ".".join(loc) or None
    message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid")
    return error_response(400, message, param=loc[0] if loc else None)


@api.exception_handler(AuthenticationError)
def on_authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(401, "Invalid or missing API key.", code="invalid_api_key")


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    message = str(exc)
    if message.startswith("Cannot parse request body"):
        message = "The request body is not valid JSON."
    return error_response(exc.status_code, message)


@api.exception_handler(RequestDataTooBig)
def on_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(413, "The request body is too large.", code="request_too_large")


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """404 for any path no route takes: OpenAI's error body under the API's prefixes, Django's page elsewhere."""
    if request.path.startswith(("/v1/", "/optima/v1/", "/api/")) or request.path in ("/v1", "/optima/v1"):
        return error_response(404, f"Unknown request URL: {request.method} {request.path}.",
                              code="unknown_url")
    return page_not_found(request, exception or Http404())


@api.exception_handler(Exception)
def on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.exception("unexpected error in %s %s", request.method, request.path)
    return error_response(500, "The gateway failed to process the request.", type="server_error")


# -- the inference endpoints, called without django-ninja's per-request work ------------------------------------------
# These three carry the traffic, and on them django-ninja's operation (its checks, its signature model, Django's
# view machinery around it) was a fifth of a 1-token request's CPU in the gateway (bench/routing.py). The lean
# handler (optimagpt/asgi.py) calls them through `direct` instead, which does what their operation does: the
# router's authentication, the body read with json.loads and validated into the same schema, every error through
# the handlers above, so callers see the same answers. django-ninja still routes them for its test client and
# describes them in the OpenAPI schema.
DirectView = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


def _direct(endpoint: Callable[..., Awaitable[HttpResponseBase]], schema: type[pydantic.BaseModel]) -> DirectView:
    async def call(request: HttpRequest) -> HttpResponseBase:
        try:
            request.auth = await openai_router.auth(request)  # type: ignore[attr-defined]
            return await endpoint(request, _body(request, schema))
        except Exception as exc:  # noqa: BLE001 - every error is answered as django-ninja would answer it
            return api.on_exception(request, exc)

    return call


_DIRECT_VIEWS: dict[str, DirectView] = {
    "/v1/chat/completions": _direct(chat_completions, ChatCompletionIn),
    "/v1/completions": _direct(completions, CompletionIn),
    "/v1/embeddings": _direct(embeddings, EmbeddingIn),
}


def direct_view(method: str, path: str) -> DirectView | None:
    """The direct call for a POST to one of the inference endpoints; None for anything else."""
    return _DIRECT_VIEWS.get(path) if method == "POST" else None


def _body(request: HttpRequest, schema: type[pydantic.BaseModel]) -> Any:
    """The body validated into `schema`, with django-ninja's errors: its HttpError for what is not JSON, its
    ValidationError (locations under ("body", "body"), the single body parameter's) for what does not fit."""
    if not request.body:
        raise ValidationError([{"loc": ("body", "body"), "msg": "Field required", "type": "missing"}])
    try:
        data = json.loads(request.body)
    except Exception as exc:  # as django-ninja: not JSON, or nested past the parser's depth
        raise HttpError(400, "Cannot parse request body") from exc
    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValidationError([{"loc": ("body", "body", *e["loc"]), "msg": e["msg"], "type": e["type"]}
                               for e in exc.errors(include_url=False)]) from None
