"""Usage accounting: tokens per key and per user per day, written in batches; budgets survive a restart."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

import gateway.limits
import gateway.usage
from accounts.models import Usage
from accounts.users import user_create
from gateway.limits import principal_admit, principal_record
from gateway.principal import Principal
from optimagpt.errors import RateLimited
from tests.factories import akey_make

pytestmark = pytest.mark.django_db(transaction=True)


async def test_tokens_are_summed_per_key_and_per_user_per_day() -> None:
    owner = await sync_to_async(user_create)(username="ann", password="a-long-enough-pass-1", user_type="admin")
    key, _ = await akey_make("k", owner=owner)
    with_key = Principal(user_id=owner.pk, api_key=key)
    with_jwt = Principal(user_id=owner.pk)
    await principal_record(principal=with_key, usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    await principal_record(principal=with_key, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    await principal_record(principal=with_jwt, usage={"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7})
    await gateway.usage._flush()
    key_row = await Usage.objects.aget(api_key=key)
    user_row = await Usage.objects.aget(user=owner)
    assert (key_row.requests, key_row.prompt_tokens, key_row.completion_tokens) == (2, 11, 7)
    assert (user_row.requests, user_row.prompt_tokens, user_row.completion_tokens) == (3, 18, 7)


async def test_a_budget_spent_before_a_restart_still_counts() -> None:
    key, _ = await akey_make("k")
    key.token_budget = 100
    await key.asave()
    principal = Principal(user_id=None, api_key=key)
    await principal_admit(principal=principal, model="m")
    await principal_record(principal=principal, usage={"prompt_tokens": 60, "completion_tokens": 40,
                                                       "total_tokens": 100})
    await gateway.usage._flush()
    # A new gateway process: empty counters, only the database remembers.
    import accounts.ratelimit

    accounts.ratelimit._counter = None
    gateway.limits._budgets_loaded.clear()
    with pytest.raises(RateLimited):
        await principal_admit(principal=principal, model="m")
