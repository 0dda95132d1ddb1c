"""What an API key may do: its models, requests and tokens per minute, and its token budget.

Counts live in accounts.ratelimit (in-process, or Redis across gateway processes).
A request is admitted before it is routed and its tokens are counted when it ends,
so a long reply can overshoot a per-minute or budget limit once; the next request
is refused.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Any

from channels.db import database_sync_to_async

from accounts.models import ApiKey
from accounts.ratelimit import Counter, MemoryCounter, counter
from accounts.usage import usage_tokens_since
from optimagpt.errors import PermissionDenied, RateLimited

from .principal import Principal
from .usage import usage_add

MINUTE_S = 60


def _budget_window(key: ApiKey, now: datetime) -> tuple[str, int]:
    """The budget counter's name for the current period, and the seconds left in it."""
    if key.budget_period == "month":
        last_day = calendar.monthrange(now.year, now.month)[1]
        end = now.replace(day=last_day, hour=23, minute=59, second=59)
        label = now.strftime("%Y-%m")
    else:
        end = now.replace(hour=23, minute=59, second=59)
        label = now.strftime("%Y-%m-%d")
    return f"budget:{key.pk}:{label}", int((end - now).total_seconds()) + 1


_budgets_loaded: set[str] = set()


async def _load_budget_spent(key: ApiKey, name: str, counts: Counter) -> None:
    """An in-process counter starts empty when the gateway starts: begin it at what the database recorded."""
    if name in _budgets_loaded or not isinstance(counts, MemoryCounter):
        return
    _budgets_loaded.add(name)
    now = datetime.now(UTC).date()
    since = now.replace(day=1) if key.budget_period == "month" else now
    spent = await database_sync_to_async(usage_tokens_since)(api_key_id=key.pk, since=since)
    if spent:
        await counts.add(name, spent, _budget_window(key, datetime.now(UTC))[1] + MINUTE_S)


async def principal_admit(*, principal: Principal, model: str) -> None:
    """Refuse the request (403 or 429) if the key may not make it now."""
    key = principal.api_key
    if key is None:
        return
    if not key.allows_model(model):
        raise PermissionDenied(f"This API key may not use the model '{model}'.", param="model",
                               code="model_not_allowed")
    counts = counter()
    if key.requests_per_minute:
        name = f"rpm:{key.pk}"
        if await counts.add(name, 1, MINUTE_S) > key.requests_per_minute:
            raise RateLimited(f"Rate limit reached: {key.requests_per_minute} requests per minute.",
                              retry_after=await counts.ttl(name))
    if key.tokens_per_minute:
        name = f"tpm:{key.pk}"
        if await counts.get(name) >= key.tokens_per_minute:
            raise RateLimited(f"Rate limit reached: {key.tokens_per_minute} tokens per minute.",
                              retry_after=await counts.ttl(name))
    if key.token_budget:
        name, seconds_left = _budget_window(key, datetime.now(UTC))
        await _load_budget_spent(key, name, counts)
        if await counts.get(name) >= key.token_budget:
            raise RateLimited(f"Token budget reached: {key.token_budget} tokens per {key.budget_period}.",
                              retry_after=seconds_left, code="budget_exceeded")


async def principal_record(*, principal: Principal, usage: dict[str, Any]) -> None:
    """Count a finished request's tokens against the key's limits."""
    key = principal.api_key
    usage_add(api_key_id=key.pk if key else None, user_id=principal.user_id, usage=usage)
    tokens = int(usage.get("total_tokens") or 0)
    if key is None or tokens <= 0:
        return
    counts = counter()
    if key.tokens_per_minute:
        await counts.add(f"tpm:{key.pk}", tokens, MINUTE_S)
    if key.token_budget:
        name, seconds_left = _budget_window(key, datetime.now(UTC))
        await counts.add(name, tokens, seconds_left + MINUTE_S)
