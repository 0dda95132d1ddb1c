"""JWTs (djangorestframework-simplejwt) for people and apps: login, refresh, logout, and checking one.

simplejwt's own checks apply: signature with our key and HS256 only (so `alg: none`
and other secrets fail), expiry, token type, the blacklist for refresh tokens, an
active user, and the hash_password claim, which a password change invalidates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import authenticate
from django.db.models.signals import m2m_changed, post_save, pre_save
from django.dispatch import receiver
from django.http import HttpRequest
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.token_blacklist.models import OutstandingToken
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken
from rest_framework_simplejwt.utils import get_md5_hash_password

from optimagpt.cache import ExpiringCache

from .models import User


class TokenRefused(Exception):
    """The credentials or token are not valid; the message is safe to show."""


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int

    def body(self) -> dict[str, object]:
        return {"access_token": self.access_token, "token_type": "Bearer", "expires_in": self.expires_in,  # nosec B105 # not a password: a token type, a prefix or an empty default
                "refresh_token": self.refresh_token}


def _lifetime() -> int:
    return int(api_settings.ACCESS_TOKEN_LIFETIME.total_seconds())


def token_pair_for_login(*, request: HttpRequest | None = None, username: str, password: str,
                         device_id: str | None = None) -> TokenPair:
    """Tokens for a username and password (sync: password hashing takes a while); `request` for the throttle."""
    user = authenticate(request, username=username, password=password)
    if user is None:
        raise TokenRefused("Incorrect username or password.")
    refresh = RefreshToken.for_user(user)
    if device_id:
        refresh["device_id"] = device_id[:200]
    return TokenPair(str(refresh.access_token), str(refresh), _lifetime())


def _current_user(token: RefreshToken | AccessToken) -> User:
    try:
        user = User.objects.get(pk=token[api_settings.USER_ID_CLAIM])
    except (User.DoesNotExist, KeyError):
        raise TokenRefused("The token's user does not exist.") from None
    if not user.is_active:
        raise TokenRefused("The token's user is deactivated.")
    if token.get(api_settings.REVOKE_TOKEN_CLAIM) != get_md5_hash_password(user.password):
        raise TokenRefused("The token was revoked by a password change.")
    return user


def token_refresh(*, refresh_token: str) -> TokenPair:
    try:
        refresh = RefreshToken(refresh_token)  # type: ignore[arg-type] # simplejwt annotates Token; it takes text
    except TokenError as exc:
        raise TokenRefused(f"Invalid refresh token: {exc}") from None
    _current_user(refresh)
    return TokenPair(str(refresh.access_token), refresh_token, _lifetime())


def token_logout(*, refresh_token: str) -> None:
    """Blacklist a refresh token; it can never make access tokens again."""
    try:
        RefreshToken(refresh_token).blacklist()  # type: ignore[arg-type] # simplejwt annotates Token; it takes text
    except TokenError as exc:
        raise TokenRefused(f"Invalid refresh token: {exc}") from None


# Verified access tokens' users, by user id: a database round trip per API call
# would cost a thread hop. Saving a user (password change, deactivation,
# permission change through the user's save) drops the entry at once.
_users: ExpiringCache[int, tuple[User, bool]] = ExpiringCache(lambda: settings.OPTIMAGPT_API_KEY_CACHE_S)


def _load_user(token: AccessToken) -> tuple[User, bool]:
    user = _current_user(token)
    return user, user.has_perm("accounts.access_gateway")


async def access_token_user(raw: str) -> tuple[User, bool]:
    """The user of a valid access token, and whether they hold Access Gateway.

    The signature and expiry are checked here, in the event loop (pure CPU);
    the database is asked only when the user is not cached.
    """
    try:
        token = AccessToken(raw)  # type: ignore[arg-type] # simplejwt annotates Token; it takes text
    except TokenError as exc:
        raise TokenRefused(f"Invalid token: {exc}") from None
    try:
        # simplejwt writes the id as text; the cache is keyed by the pk, as the signals that forget it name it.
        user_id = int(token.get(api_settings.USER_ID_CLAIM))
    except (TypeError, ValueError):
        raise TokenRefused("The token names no user.") from None
    user, allowed = await _users.get_or_load(user_id, lambda: database_sync_to_async(_load_user)(token))
    if token.get(api_settings.REVOKE_TOKEN_CLAIM) != get_md5_hash_password(user.password):
        raise TokenRefused("The token was revoked by a password change.")
    return user, allowed


def forget_user(user_id: int | None) -> None:
    """Drop a cached user (everyone, when None: a change from the permission's side names nobody)."""
    if user_id is None:
        _users.clear()
    else:
        _users.forget(user_id)


@receiver(post_save, sender=User)
def _forget_cached_user(sender: type[User], instance: User, **kwargs: object) -> None:
    forget_user(instance.pk)


@receiver(m2m_changed, sender=User.user_permissions.through)
def _forget_user_with_changed_permissions(sender: object, instance: object, **kwargs: object) -> None:
    forget_user(instance.pk if isinstance(instance, User) else None)


def access_token_for_session(user: User) -> dict[str, object]:
    """An access token for a user signed in to the pages (OptimaChat calls the API with it), shaped like the
    login's answer without a refresh token: the session is what renews it."""
    return {"access_token": str(AccessToken.for_user(user)), "token_type": "Bearer", "expires_in": _lifetime()}  # nosec B105 # not a password: a token type, a prefix or an empty default


TOKEN_DIGEST_PREFIX = "sha256:"  # nosec B105 # not a password: a token type, a prefix or an empty default


def token_digest(raw: str) -> str:
    """What the outstanding-token table keeps of a refresh token: enough to tell tokens apart, not to use one."""
    return TOKEN_DIGEST_PREFIX + hashlib.sha256(raw.encode()).hexdigest()


@receiver(pre_save, sender=OutstandingToken)
def _keep_no_usable_token(sender: type[OutstandingToken], instance: OutstandingToken, **kwargs: object) -> None:
    """simplejwt stores each refresh token whole; blacklisting needs only its jti, so a digest is kept instead."""
    if instance.token and not instance.token.startswith(TOKEN_DIGEST_PREFIX):
        instance.token = token_digest(instance.token)
