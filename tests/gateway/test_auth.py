"""API-key checks, in process: header forms, and revocation that takes effect at once."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from accounts.models import ApiKey, api_key_digest
from tests.factories import akey_make

pytestmark = pytest.mark.django_db(transaction=True)


async def _key() -> tuple[ApiKey, str]:
    return await akey_make("auth-test")


async def test_only_a_keyed_hash_of_the_key_is_stored() -> None:
    key, raw = await _key()
    assert raw.startswith("sk-optima-") and len(raw) > 40
    stored = await ApiKey.objects.aget(pk=key.pk)
    assert raw not in (stored.digest, stored.prefix) and stored.digest == api_key_digest(raw)
    assert raw.startswith(stored.prefix)


async def test_a_deleted_key_is_refused_at_once_even_after_being_cached() -> None:
    key, raw = await _key()
    client = AsyncClient()
    headers = {"Authorization": f"Bearer {raw}"}
    assert (await client.get("/v1/models", headers=headers)).status_code == 200
    await key.adelete()
    response = await client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("header", [{"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
                                    {"X-API-Key": ""}, {"Authorization": "Bearer sk-optima-" + "x" * 300}])
async def test_malformed_credentials_are_401(header: dict[str, str]) -> None:
    response = await AsyncClient().get("/v1/models", headers=header)
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_concurrent_requests_with_an_uncached_key_share_one_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from accounts import services

    key, raw = await _key()
    services._cache.clear()
    lookups = 0
    real = services._load

    def counted(raw_key: str) -> tuple[ApiKey, bool] | None:
        nonlocal lookups
        lookups += 1
        return real(raw_key)

    monkeypatch.setattr(services, "_load", counted)
    results = await asyncio.gather(*(services.api_key_authenticate(raw_key=raw) for _ in range(50)))
    assert lookups == 1
    assert all(found is not None and found[0].pk == key.pk and found[1] for found in results)


async def test_a_key_deleted_while_it_is_being_looked_up_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    from accounts import services

    key, raw = await _key()
    services._cache.clear()
    real = services._load

    def deleted_meanwhile(raw_key: str) -> tuple[ApiKey, bool] | None:
        found = real(raw_key)
        key.delete()
        return found

    monkeypatch.setattr(services, "_load", deleted_meanwhile)
    assert await services.api_key_authenticate(raw_key=raw) is not None  # it was valid when looked up
    monkeypatch.setattr(services, "_load", real)
    assert await services.api_key_authenticate(raw_key=raw) is None
