"""Secrets the gateway must use again later (a remote upstream's API key, a node's identity secret), encrypted at rest.

Fernet (AES-128-CBC with HMAC-SHA256) with a key derived from SECRET_KEY: a copy
of the database alone does not reveal the upstream keys. Changing SECRET_KEY makes
the stored keys unreadable; they must then be entered again.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


class SecretUnreadable(Exception):
    """A stored secret could not be decrypted (SECRET_KEY changed since it was saved)."""


def _fernet() -> Fernet:
    key = hashlib.sha256(b"optimagpt-upstream-keys\n" + settings.SECRET_KEY.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt(raw: str) -> str:
    return _fernet().encrypt(raw.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable("the stored upstream key cannot be decrypted; was SECRET_KEY changed?") from None
