"""Password logins, throttled per client address: the one backend every way to log in goes through.

The login page, POST /api/auth/login and Django admin's login all call `authenticate()`, which asks
this backend; so one throttle covers them all, and a form that forgets to check cannot open a gap.
Failures are counted from Django's `user_login_failed` signal, which `authenticate()` sends for each.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.signals import user_login_failed
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from django.http import HttpRequest

from optimagpt.addresses import client_address

from .models import User
from .ratelimit import login_failed, login_retry_after


class ThrottledModelBackend(ModelBackend):
    def authenticate(self, request: HttpRequest | None, username: str | None = None,
                     password: str | None = None, **kwargs: Any) -> User | None:
        if request is not None and username is not None:
            if async_to_sync(login_retry_after)(address=client_address(request), username=username):
                raise PermissionDenied("too many failed logins")  # authenticate() asks no further backend
        return super().authenticate(request, username=username, password=password, **kwargs)


@receiver(user_login_failed)
def _count_failed_login(sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None,
                        **kwargs: Any) -> None:
    if request is not None:
        async_to_sync(login_failed)(address=client_address(request), username=str(credentials.get("username", "")))
