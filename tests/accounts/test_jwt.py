"""JWT login, refresh, logout, and JWTs on the OpenAI API, in process."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient

from accounts.models import User
from tests.factories import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)


async def _post(path: str, body: dict) -> object:
    return await AsyncClient().post(path, body, content_type="application/json")


async def _login(username: str, password: str = PASSWORD):
    return await _post("/api/auth/login", {"username": username, "password": password, "deviceId": "laptop"})


async def _models(token: str) -> int:
    return (await AsyncClient().get("/v1/models", headers={"Authorization": f"Bearer {token}"})).status_code


async def test_login_returns_the_reference_fields_and_the_token_opens_the_api(admin: User) -> None:
    response = await _login("ada")
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert await _models(body["access_token"]) == 200


async def test_a_user_without_access_gateway_gets_403(member: User) -> None:
    token = (await _login("bob")).json()["access_token"]
    response = await AsyncClient().get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


async def test_a_wrong_password_is_401_and_repeated_failures_are_throttled(admin: User) -> None:
    for _ in range(settings.OPTIMAGPT_LOGIN_FAILURES):
        response = await _login("ada", "wrong-password")
        assert response.status_code == 401
        assert "wrong-password" not in response.content.decode()
    response = await _login("ada")  # even the right password waits now
    assert response.status_code == 429 and int(response["Retry-After"]) > 0


async def test_refresh_makes_a_new_access_token_and_logout_ends_the_refresh_token(admin: User) -> None:
    tokens = (await _login("ada")).json()
    refreshed = await _post("/api/auth/refresh", {"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 200 and await _models(refreshed.json()["access_token"]) == 200
    assert (await _post("/api/auth/logout", {"refresh_token": tokens["refresh_token"]})).status_code == 200
    assert (await _post("/api/auth/refresh", {"refresh_token": tokens["refresh_token"]})).status_code == 401


async def test_a_password_change_invalidates_the_users_tokens(admin: User) -> None:
    tokens = (await _login("ada")).json()
    assert await _models(tokens["access_token"]) == 200  # now cached

    def change() -> None:
        admin.set_password("another-long-password-42")
        admin.save()

    await sync_to_async(change)()
    assert await _models(tokens["access_token"]) == 401
    assert (await _post("/api/auth/refresh", {"refresh_token": tokens["refresh_token"]})).status_code == 401


async def test_deactivating_a_user_invalidates_their_tokens(admin: User) -> None:
    tokens = (await _login("ada")).json()
    assert await _models(tokens["access_token"]) == 200
    admin.is_active = False
    await admin.asave()
    assert await _models(tokens["access_token"]) == 401


def _unsigned(payload: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


async def test_forged_expired_and_malformed_tokens_are_401(admin: User) -> None:
    real = jwt.decode((await _login("ada")).json()["access_token"], options={"verify_signature": False})
    forged = [
        _unsigned(real),                                             # alg: none
        jwt.encode(real, "not-our-secret-" * 3, algorithm="HS256"),  # another secret
        jwt.encode({**real, "exp": int(time.time()) - 10}, settings.SIMPLE_JWT["SIGNING_KEY"], algorithm="HS256"),
        jwt.encode({**real, "token_type": "refresh"}, settings.SIMPLE_JWT["SIGNING_KEY"], algorithm="HS256"),
        "not.a.token",
    ]
    for token in forged:
        response = await AsyncClient().get("/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, token
        assert response.json()["error"]["code"] == "invalid_token"
        assert token not in response.content.decode()


def test_the_jwt_key_is_not_a_default() -> None:
    assert settings.SIMPLE_JWT["SIGNING_KEY"] not in (settings.SECRET_KEY, "", None)
    assert len(settings.SIMPLE_JWT["SIGNING_KEY"]) >= 32


async def test_no_password_or_token_reaches_the_logs(admin: User, caplog) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    await _login("ada", "a-wrong-password-123")
    tokens = (await _login("ada")).json()
    await _post("/api/auth/refresh", {"refresh_token": tokens["refresh_token"]})
    await _models(tokens["access_token"])
    await _models(tokens["access_token"] + "x")
    await _post("/api/auth/logout", {"refresh_token": tokens["refresh_token"]})
    for secret in (PASSWORD, "a-wrong-password-123", tokens["access_token"], tokens["refresh_token"]):
        assert secret not in caplog.text


async def test_the_database_keeps_no_usable_refresh_token(admin: User) -> None:
    from rest_framework_simplejwt.token_blacklist.models import OutstandingToken

    refresh = (await _login("ada")).json()["refresh_token"]
    stored = [row.token async for row in OutstandingToken.objects.all()]
    assert stored and refresh not in stored and all(token.startswith("sha256:") for token in stored)
    for token in stored:  # what someone who read the table holds
        assert (await _post("/api/auth/refresh", {"refresh_token": token})).status_code == 401
    assert (await _post("/api/auth/refresh", {"refresh_token": refresh})).status_code == 200
    assert (await _post("/api/auth/logout", {"refresh_token": refresh})).status_code == 200
    assert (await _post("/api/auth/refresh", {"refresh_token": refresh})).status_code == 401, "blacklisting works"
