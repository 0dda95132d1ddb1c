"""Who is calling the OpenAI API: an API key (three header forms) or a user's JWT access token."""

from __future__ import annotations

import time

from channels.db import database_sync_to_async
from django.http import HttpRequest
from django.utils import timezone
from ninja.security.base import AuthBase

from accounts.models import KEY_PREFIX, SCOPE_CONVERSATIONS, SCOPE_INFERENCE, SCOPE_MANAGEMENT, User
from accounts.ratelimit import address_admit, authentication_failed
from accounts.services import api_key_authenticate
from accounts.tokens import TokenRefused, access_token_user
from operations.record import note_auth
from optimagpt.addresses import client_address
from optimagpt.errors import AuthenticationFailed, PermissionDenied

from .principal import Principal


def raw_key_from_headers(request: HttpRequest) -> str | None:
    """`Authorization: Bearer <key or JWT>`, `Authorization: ApiKey <key>` or `X-API-Key: <key>`."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("bearer", "apikey") and value.strip():
            return value.strip()
        return None
    value = request.headers.get("X-API-Key", "").strip()
    return value or None


class ApiKeyAuth(AuthBase):
    """An API key holding one of `scopes`, or a JWT of a user that `jwt_allows`."""

    openapi_type = "http"
    openapi_scheme = "bearer"
    scopes: tuple[str, ...] = (SCOPE_INFERENCE,)

    async def __call__(self, request: HttpRequest) -> Principal:
        """The caller; failed attempts are counted per client address, and refused with 429 past its limit."""
        started = time.time_ns()
        address = client_address(request)
        await address_admit(address)
        try:
            principal = await self._authenticate(request)
        except AuthenticationFailed:
            await authentication_failed(address)
            raise
        note_auth(started, principal)
        return principal

    async def _authenticate(self, request: HttpRequest) -> Principal:
        raw = raw_key_from_headers(request)
        if raw is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
                code="missing_api_key",
            )
        if raw.startswith(KEY_PREFIX) or raw.count(".") != 2:
            return await self._key(raw)
        return await self._jwt(raw)

    async def _key(self, raw: str) -> Principal:
        found = await api_key_authenticate(raw_key=raw)
        if found is None:
            # Never echo the key back: it may be a real key pasted into the wrong place.
            raise AuthenticationFailed("Incorrect API key provided.")
        key, owner_ok = found
        if key.is_expired(timezone.now()):
            raise AuthenticationFailed("This API key has expired.", code="api_key_expired")
        if not owner_ok:
            raise PermissionDenied("The owner of this API key may not use the API (Access Gateway).")
        if not any(key.has_scope(scope) for scope in self.scopes):
            raise PermissionDenied(f"This API key lacks the scope this needs ({' or '.join(self.scopes)}); "
                                   "scopes are granted when a key is created.", code="missing_scope")
        return Principal(user_id=key.owner_id, api_key=key)

    async def _jwt(self, raw: str) -> Principal:
        try:
            user, gateway_ok = await access_token_user(raw)
        except TokenRefused as exc:
            raise AuthenticationFailed(str(exc), code="invalid_token") from None
        if not await self.jwt_allows(user, gateway_ok):
            raise PermissionDenied(self.jwt_refusal)
        return Principal(user_id=user.pk)

    jwt_refusal = "You may not use the API: you lack the Access Gateway permission."

    async def jwt_allows(self, user: User, gateway_ok: bool) -> bool:
        """Whether a signed-in user may call this part of the API (here: they hold Access Gateway)."""
        return gateway_ok


class ChatAuth(ApiKeyAuth):
    """What OptimaChat calls: a JWT of a user with the Chat permission (chat users need not hold Access
    Gateway) or with Access Gateway, or an API key as on the rest of the API."""

    jwt_refusal = "You may not use OptimaChat: you lack the Chat permission."
    scopes: tuple[str, ...] = (SCOPE_CONVERSATIONS,)

    async def jwt_allows(self, user: User, gateway_ok: bool) -> bool:
        return gateway_ok or await database_sync_to_async(user.has_perm)("accounts.chat")


class ModelListAuth(ChatAuth):
    """The model lists serve API callers and OptimaChat alike: either scope will do."""

    scopes = (SCOPE_INFERENCE, SCOPE_CONVERSATIONS)


class ManagementAuth(ApiKeyAuth):
    """Managing executors: a key with the management scope or a JWT, of a user who holds Executor Management.

    Checked here, before django-ninja reads the body: a caller who may not manage executors learns that
    (403), whatever they sent."""

    scopes = (SCOPE_MANAGEMENT,)
    permission = "accounts.manage_executors"
    refusal = "Managing executors needs the Executor Management permission."

    async def __call__(self, request: HttpRequest) -> Principal:
        principal = await super().__call__(request)
        if not await database_sync_to_async(_holds)(principal.user_id, self.permission):
            raise PermissionDenied(self.refusal)
        return principal


class SettingsAuth(ManagementAuth):
    """The gateway's operations endpoints (the request log): a management key or a JWT, of a user with
    Settings Access."""

    permission = "accounts.access_settings"
    refusal = "This needs the Settings Access permission."


def _holds(user_id: int | None, permission: str) -> bool:
    user = User.objects.filter(pk=user_id, is_active=True).first() if user_id else None
    return user is not None and user.has_perm(permission)
