"""Ending the requests of a key that was revoked, or of an owner who may no longer use their keys.

Each gateway process tracks the requests it has in flight by API key (queued or streaming).
A change saved in this process reaches it through the signals below at once; one saved in
another process arrives through gateway/invalidation.py, which calls the same functions.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from accounts.models import ApiKey, User

from .principal import Principal


class Revocable(Protocol):
    principal: Principal
    revoked: bool

    async def revoke(self) -> None: ...


# Requests in flight in this process (queued or sent), by API key, so that revoking a key ends them.
# Touched only on the event loop that runs the requests (`_loop`).
_calls_by_key: dict[int, set[Revocable]] = {}
_loop: asyncio.AbstractEventLoop | None = None


def track(request: Revocable) -> None:
    """Count a request of a key as in flight here (from the loop that runs it), until `untrack`."""
    global _loop
    _loop = asyncio.get_running_loop()
    key = request.principal.api_key
    if key is not None:
        _calls_by_key.setdefault(key.pk, set()).add(request)


def untrack(request: Revocable) -> None:
    key = request.principal.api_key
    if key is not None:
        calls = _calls_by_key.get(key.pk)
        if calls is not None:
            calls.discard(request)
            if not calls:
                del _calls_by_key[key.pk]


def _on_the_loop(function: Any, *args: Any) -> None:
    """Run `function` on the loop that runs the requests: at once from it, else soon. Safe from any thread."""
    loop = _loop
    if loop is None or loop.is_closed():
        return
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    if on_loop:
        function(*args)
    else:
        loop.call_soon_threadsafe(function, *args)


def revoke_calls_of_key(key_id: int) -> None:
    """End this process's requests made with a revoked key. Safe from any thread (signals run in many)."""
    _on_the_loop(_revoke_now, lambda call: call.principal.api_key.pk == key_id, key_id)


def revoke_calls_of_owner(user_id: int) -> None:
    """End this process's requests made with the keys of a user who may no longer use them."""
    _on_the_loop(_revoke_now, lambda call: call.principal.api_key.owner_id == user_id)


def _revoke_now(matches: Any, key_id: int | None = None) -> None:
    calls = _calls_by_key.get(key_id, ()) if key_id is not None else \
        [call for calls in _calls_by_key.values() for call in calls]
    for call in list(calls):
        if not call.revoked and matches(call):
            call.revoked = True
            asyncio.ensure_future(call.revoke())


@receiver(post_delete, sender=ApiKey)
def _end_requests_of_revoked_key(sender: type[ApiKey], instance: ApiKey, **kwargs: Any) -> None:
    revoke_calls_of_key(instance.pk)


@receiver(post_save, sender=User)
def _end_requests_of_deactivated_owner(sender: type[User], instance: User, **kwargs: Any) -> None:
    if not instance.is_active:
        revoke_calls_of_owner(instance.pk)


@receiver(m2m_changed, sender=User.user_permissions.through)
def _end_requests_of_owner_without_access(sender: object, instance: object, action: str = "",
                                          **kwargs: Any) -> None:
    if action in ("post_remove", "post_clear") and isinstance(instance, User):
        user = User.objects.filter(pk=instance.pk).first()  # a fresh row: the instance caches its permissions
        if user is None or not user.has_perm("accounts.access_gateway"):
            revoke_calls_of_owner(instance.pk)
