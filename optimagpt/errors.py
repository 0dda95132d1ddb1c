"""Errors the APIs report, and OpenAI's `{"error": {...}}` body they are sent as: the one place it is built.

Project-wide (accounts, nodes, chat and gateway raise them alike); imports nothing of the project.
Endpoints declare `response={200: TheirOut, **ERRORS}` so /docs shows the error body too.
"""

from __future__ import annotations

from pydantic import BaseModel


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, dict[str, str | None]]:
    """OpenAI's error object, as every /v1 and /optima/v1 error answers (unknown paths included)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetailOut(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorOut(BaseModel):
    """OpenAI's error body, as every error of /v1, /optima/v1 and /api/auth is sent."""

    error: ErrorDetailOut


# The statuses our APIs answer with an error body (each endpoint may send fewer).
ERROR_STATUSES = frozenset({400, 401, 403, 404, 408, 409, 413, 429, 500, 502, 503, 504})
ERRORS: dict[frozenset[int], type[BaseModel]] = {ERROR_STATUSES: ErrorOut}


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    retry_after: int | None = None  # seconds, sent as Retry-After

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if retry_after is not None:
            self.retry_after = max(1, retry_after)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def body(self) -> dict[str, dict[str, str | None]]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


class InvalidRequest(ApiError):
    pass


class AuthenticationFailed(ApiError):
    status = 401
    code = "invalid_api_key"


class PermissionDenied(ApiError):
    status = 403
    code = "permission_denied"


class RateLimited(ApiError):
    """Over a rate limit or token budget: 429, with Retry-After."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, retry_after)


class QueueFull(ApiError):
    """Every slot for the model is busy and its queue is full: 429, with Retry-After."""

    status = 429
    type = "server_error"
    code = "queue_full"


class ModelNotFound(ApiError):
    status = 404
    code = "model_not_found"


class NoCapacity(ApiError):
    """Known model, but no connected node can serve it now."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class UpstreamError(ApiError):
    """The node or its inference process failed the request."""

    status = 502
    type = "server_error"
    code = "node_error"


class UpstreamTimeout(ApiError):
    status = 504
    type = "server_error"
    code = "timeout"


class Conflict(ApiError):
    """The request is fine but the object is not in a state that allows it (a node offline, a file-backed row)."""

    status = 409
    code = "conflict"
