"""Authenticating API keys, with a small in-process cache in front of the database.

A database round trip costs a thread hop per request on the async API path.
Verified keys are kept for OPTIMAGPT_API_KEY_CACHE_S seconds; saving or deleting
a key drops it from this process's cache at once (signals below), so in the
embedded default a revoked key stops working immediately. Other gateway
processes notice within the cache lifetime.
"""

from __future__ import annotations

from datetime import timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from optimagpt.cache import ExpiringCache

from .models import ApiKey, User, api_key_digest

# Writing last_used_at on every request would put a database write on the hot path.
LAST_USED_RESOLUTION = timedelta(minutes=1)

# digest -> (key, whether its owner may use the API)
_cache: ExpiringCache[str, tuple[ApiKey, bool] | None] = ExpiringCache(lambda: settings.OPTIMAGPT_API_KEY_CACHE_S)


def _load(raw_key: str) -> tuple[ApiKey, bool] | None:
    key = ApiKey.objects.for_raw_key(raw_key)
    if key is None:
        return None
    # A key acts for its owner: a deactivated owner, or one without Access Gateway, disables it.
    owner_ok = key.owner is None or (key.owner.is_active and key.owner.has_perm("accounts.access_gateway"))
    return key, owner_ok


async def api_key_authenticate(*, raw_key: str) -> tuple[ApiKey, bool] | None:
    """The ApiKey that `raw_key` is and whether its owner may use the API; None for no key."""
    digest = api_key_digest(raw_key)
    # database_sync_to_async, not the async ORM: it also tidies the thread's
    # connections, which the API's lean handler leaves to the queries themselves.
    loaded = await _cache.get_or_load(digest, lambda: database_sync_to_async(_load)(raw_key),
                                      keep=lambda found: found is not None)
    if loaded is None:
        return None
    key, owner_ok = loaded
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        key.last_used_at = now
        await database_sync_to_async(ApiKey.objects.filter(pk=key.pk).update)(last_used_at=now)
    return key, owner_ok


def forget_key(digest: str) -> None:
    _cache.forget(digest)


def forget_keys_of_user(user_id: int | None) -> None:
    """Drop the keys owned by `user_id` (by anyone, when None: we cannot tell whose)."""
    _cache.forget_where(lambda digest, found: user_id is None or (found is not None and found[0].owner_id == user_id))


@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def _forget_cached_key(sender: type[ApiKey], instance: ApiKey, **kwargs: object) -> None:
    forget_key(instance.digest)


@receiver(post_save, sender=User)
def _forget_keys_of_changed_user(sender: type[User], instance: User, **kwargs: object) -> None:
    forget_keys_of_user(instance.pk)


@receiver(m2m_changed, sender=User.user_permissions.through)
def _forget_keys_of_user_with_changed_permissions(sender: object, instance: object, **kwargs: object) -> None:
    # Access Gateway decides whether a user's keys work: a cached key must not outlive its removal.
    forget_keys_of_user(instance.pk if isinstance(instance, User) else None)
