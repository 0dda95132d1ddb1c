from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models

if TYPE_CHECKING:
    from django_stubs_ext import StrPromise

KEY_PREFIX = "sk-optima-"
# Shown in lists so people can tell keys apart; far too short to guess the rest from.
VISIBLE_CHARS = len(KEY_PREFIX) + 6

# What a key may do. Inference (/v1, and the model lists) is every key's default; reading and writing its
# owner's OptimaChat conversations, or managing executors as its owner may, must be granted at creation.
SCOPE_INFERENCE = "inference"
SCOPE_CONVERSATIONS = "conversations"
SCOPE_MANAGEMENT = "management"
SCOPES = [(SCOPE_INFERENCE, "Inference"), (SCOPE_CONVERSATIONS, "Conversations"), (SCOPE_MANAGEMENT, "Management")]


def default_scopes() -> list[str]:
    return [SCOPE_INFERENCE]


# The product's permissions, as Django permissions on the User model
# (README.md, "People, permissions and keys", lists them).
PERMISSIONS: list[tuple[str, str | StrPromise]] = [
    ("chat", "Chat"),
    ("access_gateway", "Access Gateway"),
    ("manage_nodes", "Node Management"),
    ("manage_executors", "Executor Management"),
    ("manage_api_keys", "API Key Management"),
    ("manage_certificates", "Certificate Management"),
    ("manage_users", "User Management"),
    ("access_settings", "Settings Access"),
    ("manage_mcp", "MCP Management"),
]


class User(AbstractUser):
    """A person: an Admin (management screens and Django admin) or a User (OptimaChat only)."""

    class Type(models.TextChoices):
        ADMIN = "admin", "Admin"
        USER = "user", "User"

    user_type = models.CharField(max_length=8, choices=Type.choices, default=Type.USER)

    class Meta(AbstractUser.Meta):
        permissions = PERMISSIONS
        swappable = "AUTH_USER_MODEL"


def api_key_digest(raw_key: str) -> str:
    """Keyed hash of an API key: a stolen database alone does not let anyone check guesses."""
    secret = hashlib.sha256(b"optimagpt-api-key\n" + settings.SECRET_KEY.encode()).digest()
    return hmac.new(secret, raw_key.encode(), hashlib.sha256).hexdigest()


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def for_raw_key(self, raw_key: str) -> ApiKey | None:
        """The key that `raw_key` is, compared in constant time; None for anything else."""
        if not raw_key.startswith(KEY_PREFIX) or len(raw_key) > 200:
            return None
        digest = api_key_digest(raw_key)
        key = self.select_related("owner").filter(digest=digest).first()
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return key


class ApiKey(models.Model):
    """An application's credential. Only a keyed hash is stored; the key is shown once, at creation."""

    name = models.CharField(max_length=100)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                              related_name="api_keys")
    prefix = models.CharField(max_length=VISIBLE_CHARS, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="the key stops working at this time")
    allowed_models = models.JSONField(default=list, blank=True,
                                      help_text="model ids this key may use; empty means every model")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    token_budget = models.PositiveBigIntegerField(null=True, blank=True,
                                                  help_text="prompt plus completion tokens per budget period")
    budget_period = models.CharField(max_length=5, choices=[("day", "per day"), ("month", "per month")],
                                     default="day")
    scopes = models.JSONField(default=default_scopes, blank=True,
                              help_text="what the key may do: inference, conversations, management")
    allowed_mcp_servers = models.JSONField(default=list, blank=True,
                                           help_text="MCP server names this key may use; empty means every "
                                                     "server open to the API")
    default_mcp_servers = models.JSONField(default=list, blank=True,
                                           help_text="MCP servers a request of this key uses when it names none")

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=models.Q(budget_period__in=["day", "month"]),
                                   name="apikey_budget_period_valid"),
        ]

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def allows_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def allows_mcp_server(self, name: str) -> bool:
        return not self.allowed_mcp_servers or name in self.allowed_mcp_servers

    def has_scope(self, scope: str) -> bool:
        return isinstance(self.scopes, list) and scope in self.scopes

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def create_with_raw_key(cls, *, name: str, owner: User | None = None,
                            scopes: list[str] | None = None) -> tuple[ApiKey, str]:
        """Make a key; the raw key is returned here and never again."""
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(name=name, owner=owner, prefix=raw[:VISIBLE_CHARS], digest=api_key_digest(raw),
                                 scopes=scopes if scopes is not None else default_scopes())
        return key, raw


class Usage(models.Model):
    """Tokens used in one day (UTC) through one API key, or by one user (JWT or any of their keys)."""

    day = models.DateField()
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="usage")
    user = models.ForeignKey(User, null=True, blank=True, on_delete=models.CASCADE, related_name="usage")
    requests = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-day"]
        constraints = [
            # One row per key and day, one per user and day: each row counts for exactly one of them.
            models.CheckConstraint(condition=models.Q(api_key__isnull=True) ^ models.Q(user__isnull=True),
                                   name="usage_for_key_or_user"),
            models.UniqueConstraint(fields=["day", "api_key"], condition=models.Q(api_key__isnull=False),
                                    name="usage_unique_key_day"),
            models.UniqueConstraint(fields=["day", "user"], condition=models.Q(user__isnull=False),
                                    name="usage_unique_user_day"),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.api_key or self.user}: {self.prompt_tokens}+{self.completion_tokens}"
