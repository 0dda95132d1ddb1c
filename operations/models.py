"""What the Configuration page stores (settings and their audit) and the request log."""

from __future__ import annotations

from django.db import models


class GatewaySetting(models.Model):
    """A gateway setting changed on the Configuration page; it wins over the environment's value until reset."""

    name = models.CharField(max_length=100, primary_key=True)
    value = models.JSONField()
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.CharField(max_length=150, blank=True)

    def __str__(self) -> str:
        return self.name


class SettingChange(models.Model):
    """Who changed which setting, when, from what to what (a node access key is never written here)."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    username = models.CharField(max_length=150)
    name = models.CharField(max_length=100)
    old = models.TextField(blank=True)
    new = models.TextField(blank=True)

    class Meta:
        ordering = ["-at", "-pk"]

    def __str__(self) -> str:
        return f"{self.name} by {self.username}"


class RequestLogEntry(models.Model):
    """One API request, as the request log keeps it: its figures, never its prompt or reply."""

    at = models.DateTimeField(db_index=True, help_text="when the request arrived")
    key_prefix = models.CharField(max_length=32, blank=True)
    user = models.CharField(max_length=150, blank=True)
    client = models.CharField(max_length=64, blank=True, help_text="the client's address")
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=200)
    operation = models.CharField(max_length=40)
    model = models.CharField(max_length=200, blank=True)
    stream = models.BooleanField(default=False)
    status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    latency_ms = models.FloatField()
    ttft_ms = models.FloatField(null=True, blank=True, help_text="time to first token, streamed replies")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    node = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-at", "-pk"]
        indexes = [models.Index(fields=["model", "at"], name="requestlog_model_at"),
                   models.Index(fields=["status", "at"], name="requestlog_status_at")]

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.status}"
