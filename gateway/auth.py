"""API-key authentication for the OpenAI API, in the three header forms clients use."""

from __future__ import annotations

from django.http import HttpRequest
from ninja.security.base import AuthBase

from accounts.models import ApiKey
from accounts.services import api_key_authenticate

from .errors import AuthenticationFailed


def raw_key_from_headers(request: HttpRequest) -> str | None:
    """`Authorization: Bearer <key>`, `Authorization: ApiKey <key>` or `X-API-Key: <key>`."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("bearer", "apikey") and value.strip():
            return value.strip()
        return None
    value = request.headers.get("X-API-Key", "").strip()
    return value or None


class ApiKeyAuth(AuthBase):
    openapi_type = "http"
    openapi_scheme = "bearer"

    async def __call__(self, request: HttpRequest) -> ApiKey:
        raw = raw_key_from_headers(request)
        if raw is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
                code="missing_api_key",
            )
        key = await api_key_authenticate(raw_key=raw)
        if key is None:
            # Never echo the key back: it may be a real key pasted into the wrong place.
            raise AuthenticationFailed("Incorrect API key provided.")
        return key
