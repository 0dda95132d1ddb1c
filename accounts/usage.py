"""Usage accounting: tokens per API key and per user per day."""

from __future__ import annotations

from datetime import date
from typing import TypedDict

from django.db import IntegrityError, transaction
from django.db.models import F, Sum

from .models import ApiKey, Usage, User


class UsageRow(TypedDict):
    day: str  # ISO date, UTC
    api_key_id: int | None
    user_id: int | None
    requests: int
    prompt_tokens: int
    completion_tokens: int


def _add(filters: dict[str, object], row: UsageRow) -> None:
    increments = {"requests": F("requests") + row["requests"],
                  "prompt_tokens": F("prompt_tokens") + row["prompt_tokens"],
                  "completion_tokens": F("completion_tokens") + row["completion_tokens"]}
    if Usage.objects.filter(**filters).update(**increments):
        return
    try:
        with transaction.atomic():
            Usage.objects.create(**filters, requests=row["requests"], prompt_tokens=row["prompt_tokens"],
                                 completion_tokens=row["completion_tokens"])
    except IntegrityError:  # another process made the row first: add to it
        Usage.objects.filter(**filters).update(**increments)


def usage_add(*, rows: list[UsageRow]) -> None:
    """Add each row to its key's and its user's day; rows of keys or users deleted since are dropped."""
    key_ids = set(ApiKey.objects.filter(pk__in={r["api_key_id"] for r in rows if r["api_key_id"]})
                  .values_list("pk", flat=True))
    user_ids = set(User.objects.filter(pk__in={r["user_id"] for r in rows if r["user_id"]})
                   .values_list("pk", flat=True))
    for row in rows:
        day = date.fromisoformat(row["day"])
        if row["api_key_id"] in key_ids:
            _add({"day": day, "api_key_id": row["api_key_id"]}, row)
        if row["user_id"] in user_ids:
            _add({"day": day, "user_id": row["user_id"]}, row)


def usage_tokens_since(*, api_key_id: int, since: date) -> int:
    total = Usage.objects.filter(api_key_id=api_key_id, day__gte=since).aggregate(
        total=Sum(F("prompt_tokens") + F("completion_tokens")))["total"]
    return int(total or 0)
