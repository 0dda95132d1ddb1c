"""Configuration mistakes, reported as Django system checks with a hint."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.security)
def check_secret_key(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    if settings.SECRET_KEY_MISSING and not settings.DEBUG:
        return [checks.Error(
            "SECRET_KEY is not set, and DEBUG is off.",
            hint="Set SECRET_KEY (or SECRET_KEY_FILE) to a long random string, e.g. the output of "
                 "python -c 'import secrets; print(secrets.token_urlsafe(50))'. ./optimagpt.sh run makes one.",
            id="optimagpt.E001",
        )]
    return []


@checks.register(checks.Tags.security)
def check_node_access_key(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    key = settings.OPTIMAGPT_NODE_ACCESS_KEY
    if not key:
        return [checks.Warning(
            "OPTIMAGPT_NODE_ACCESS_KEY is not set, so every node link is refused.",
            hint="Set OPTIMAGPT_NODE_ACCESS_KEY (or OPTIMAGPT_NODE_ACCESS_KEY_FILE) to a long random string, "
                 "the same on the gateway and its nodes.",
            id="optimagpt.W001",
        )]
    if len(key) < 16:
        return [checks.Warning(
            "OPTIMAGPT_NODE_ACCESS_KEY is shorter than 16 characters.",
            hint="A short key can be guessed offline from one recorded handshake; use a long random string, e.g. "
                 "python -c 'import secrets; print(secrets.token_urlsafe(32))'.",
            id="optimagpt.W002",
        )]
    return []


@checks.register(checks.Tags.compatibility)
def check_channel_layer(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    backend = str(settings.CHANNEL_LAYERS["default"]["BACKEND"])
    if backend.endswith("InMemoryChannelLayer") and settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        return [checks.Warning(
            "PostgreSQL is configured but the channel layer is in-memory.",
            hint="Several gateway processes share one database only if they also share a channel layer: "
                 "set REDIS_URL, or run a single gateway process.",
            id="optimagpt.W003",
        )]
    return []
