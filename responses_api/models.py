"""Stored responses of the Responses API (`store: true`, the default): what was asked, what came back."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

ACTIVE = ("queued", "in_progress")


class StoredResponse(models.Model):
    """One response, as `GET /v1/responses/{id}` returns it, and the input items of its own request.

    The owner is the key's owner or the JWT's user (`user`); a key without an owner owns its own responses
    (`api_key`, with no user). A background response still running is `queued` or `in_progress`, and its
    process touches `updated_at` every few seconds (responses_api/runner.py); one that stopped touching it
    is reported failed.
    """

    id = models.CharField(primary_key=True, max_length=64)  # resp_<hex>
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="+")
    api_key = models.ForeignKey("accounts.ApiKey", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=[(s, s) for s in (
        "queued", "in_progress", "completed", "incomplete", "failed", "cancelled")])
    background = models.BooleanField(default=False)
    previous_id = models.CharField(max_length=64, blank=True, default="",
                                   help_text="previous_response_id of the request (not a key: it may be deleted)")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    settings = models.JSONField(default=dict, help_text="the request's settings the response echoes")
    input_items = models.JSONField(default=list, help_text="the request's own input items, each with an id")
    output = models.JSONField(default=list)
    usage = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    incomplete_details = models.JSONField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["status", "updated_at"], name="responses_active")]

    def __str__(self) -> str:
        return self.id

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def snapshot(self) -> dict[str, Any]:
        """What the response object is built from (responses_api/items.py `response_object`)."""
        return {"id": self.id, "model": self.model, "status": self.status, "background": self.background,
                "created_at": int(self.created_at.timestamp()),
                "completed_at": int(self.completed_at.timestamp()) if self.completed_at else None,
                "settings": self.settings, "output": self.output, "usage": self.usage, "error": self.error,
                "incomplete_details": self.incomplete_details}
