"""JWT endpoints: POST /api/auth/login, /api/auth/refresh, /api/auth/logout."""

from __future__ import annotations

from typing import Annotated, Literal

from channels.db import database_sync_to_async
from django.http import HttpRequest, JsonResponse
from ninja import Router
from pydantic import BaseModel, ConfigDict, Field

from optimagpt.addresses import client_address
from optimagpt.errors import ERRORS, AuthenticationFailed, RateLimited

from .ratelimit import login_retry_after
from .tokens import TokenRefused, token_logout, token_pair_for_login, token_refresh

router = Router(tags=["Auth"])


class AuthIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoginIn(AuthIn):
    username: Annotated[str, Field(min_length=1, max_length=150)]
    password: Annotated[str, Field(min_length=1, max_length=4096)]
    deviceId: Annotated[str, Field(max_length=200)] | None = None  # noqa: N815 - the reference API's name


class RefreshIn(AuthIn):
    refresh_token: Annotated[str, Field(min_length=1, max_length=4096)]


class TokenPairOut(BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int = Field(description="seconds the access token stays valid")
    refresh_token: str


class LoggedOutOut(BaseModel):
    """An empty object."""


@router.post("/login", summary="Log in with username and password; returns JWTs",
             response={200: TokenPairOut, **ERRORS})
async def login(request: HttpRequest, body: LoginIn) -> JsonResponse:
    address = client_address(request)
    retry_after = await login_retry_after(address=address, username=body.username)
    if retry_after:
        raise RateLimited(f"Too many failed logins; try again in {retry_after} s.", retry_after=retry_after,
                          code="too_many_attempts")
    try:
        pair = await database_sync_to_async(token_pair_for_login)(
            request=request, username=body.username, password=body.password, device_id=body.deviceId)
    except TokenRefused as exc:  # the failure is counted by accounts.backends
        raise AuthenticationFailed(str(exc), code="invalid_credentials") from None
    return JsonResponse(pair.body())


@router.post("/refresh", summary="A new access token for a refresh token",
             response={200: TokenPairOut, **ERRORS})
async def refresh(request: HttpRequest, body: RefreshIn) -> JsonResponse:
    try:
        pair = await database_sync_to_async(token_refresh)(refresh_token=body.refresh_token)
    except TokenRefused as exc:
        raise AuthenticationFailed(str(exc), code="invalid_token") from None
    return JsonResponse(pair.body())


@router.post("/logout", summary="Blacklist a refresh token", response={200: LoggedOutOut, **ERRORS})
async def logout(request: HttpRequest, body: RefreshIn) -> JsonResponse:
    try:
        await database_sync_to_async(token_logout)(refresh_token=body.refresh_token)
    except TokenRefused as exc:
        raise AuthenticationFailed(str(exc), code="invalid_token") from None
    return JsonResponse({})
