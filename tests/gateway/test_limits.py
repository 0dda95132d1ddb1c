"""API-key limits through the API, in process: model lists, per-minute limits, budgets, expiry."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import AsyncClient
from django.utils import timezone

from accounts.models import ApiKey
from gateway.limits import principal_admit, principal_record
from gateway.principal import Principal
from optimagpt.errors import RateLimited
from tests.factories import akey_make

pytestmark = pytest.mark.django_db(transaction=True)


async def _key(**limits) -> tuple[ApiKey, str]:
    return await akey_make("limits", **limits)


async def _chat(raw: str, model: str = "m"):
    return await AsyncClient().post("/v1/chat/completions", {"model": model, "messages": [
        {"role": "user", "content": "hi"}]}, content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"})


async def test_a_model_outside_the_keys_list_is_403_not_404() -> None:
    _, raw = await _key(allowed_models=["smollm2"])
    response = await _chat(raw, model="gemma")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_allowed"
    assert (await _chat(raw, model="smollm2")).status_code == 404  # allowed, but nobody serves it


async def test_requests_over_the_per_minute_limit_get_429_with_retry_after() -> None:
    _, raw = await _key(requests_per_minute=2)
    assert [(await _chat(raw)).status_code for _ in range(2)] == [404, 404]
    response = await _chat(raw)
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 60
    assert response.json()["error"]["type"] == "rate_limit_exceeded"


async def test_tokens_per_minute_and_the_budget_refuse_once_spent() -> None:
    key, _ = await _key(tokens_per_minute=100)
    principal = Principal(user_id=None, api_key=key)
    await principal_admit(principal=principal, model="m")
    await principal_record(principal=principal, usage={"total_tokens": 150})
    with pytest.raises(RateLimited) as exc:
        await principal_admit(principal=principal, model="m")
    assert exc.value.retry_after <= 60

    key, _ = await _key(token_budget=1000, budget_period="month")
    principal = Principal(user_id=None, api_key=key)
    await principal_record(principal=principal, usage={"total_tokens": 999})
    await principal_admit(principal=principal, model="m")
    await principal_record(principal=principal, usage={"total_tokens": 1})
    with pytest.raises(RateLimited) as exc:
        await principal_admit(principal=principal, model="m")
    assert exc.value.code == "budget_exceeded" and exc.value.retry_after <= 31 * 24 * 3600


async def test_an_expired_key_is_401() -> None:
    _, raw = await _key(expires_at=timezone.now() - timedelta(seconds=1))
    response = await _chat(raw)
    assert response.status_code == 401 and response.json()["error"]["code"] == "api_key_expired"
