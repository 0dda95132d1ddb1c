"""API-key authentication for the OpenAI API, in the three header forms clients use."""

from __future__ import annotations

from datetime import timedelta

from django.http import HttpRequest
from django.utils import timezone
from ninja.security.base import AuthBase

from accounts.models import ApiKey

from .errors import AuthenticationFailed

# Writing last_used_at on every request would put a database write on the hot path.
LAST_USED_RESOLUTION = timedelta(minutes=1)


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
        key = await ApiKey.objects.afor_raw_key(raw)
        if key is None:
            # Never echo the key back: it may be a real key pasted into the wrong place.
            raise AuthenticationFailed("Incorrect API key provided.")
        now = timezone.now()
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            await ApiKey.objects.filter(pk=key.pk).aupdate(last_used_at=now)
        return key
