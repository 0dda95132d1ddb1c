"""MCP servers an admin registered: where they are, whether Chat and the API may use them, what tools they had."""

from __future__ import annotations

from typing import Any

from django.db import models

from optimagpt.secrets import decrypt, encrypt


class McpServer(models.Model):
    """One MCP server. Its tools are offered to models as `<name>_<tool>` (mcp_servers/names.py)."""

    class Transport(models.TextChoices):
        HTTP = "http", "Streamable HTTP (SSE as the fallback)"
        STDIO = "stdio", "stdio (a command the operator listed in OPTIMAGPT_MCP_STDIO_COMMANDS)"

    class Status(models.TextChoices):
        CONNECTING = "connecting", "Connecting"
        CONNECTED = "connected", "Connected"
        FAILED = "failed", "Failed"

    name = models.CharField(max_length=32, unique=True,
                            help_text="letters, digits and hyphens; tools are offered as <name>_<tool>")
    transport = models.CharField(max_length=8, choices=Transport.choices, default=Transport.HTTP)
    url = models.CharField(max_length=2000, blank=True, help_text="the Streamable HTTP (or SSE) endpoint")
    command = models.CharField(max_length=64, blank=True,
                               help_text="for stdio: a name from OPTIMAGPT_MCP_STDIO_COMMANDS")
    # Sent as `Authorization: Bearer ...`; encrypted (optimagpt/secrets.py) and never shown again.
    token_encrypted = models.TextField(blank=True, editable=False)
    chat_enabled = models.BooleanField(default=True, help_text="offered in OptimaChat")
    api_enabled = models.BooleanField(default=True, help_text="usable by /v1 callers")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.CONNECTING, editable=False)
    last_error = models.CharField(max_length=500, blank=True, editable=False)
    tools = models.JSONField(default=list, blank=True, editable=False,
                             help_text="[{name, description, input_schema}] as last fetched")
    checked_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "MCP server"

    def __str__(self) -> str:
        return self.name

    @property
    def has_token(self) -> bool:
        return bool(self.token_encrypted)

    def set_token(self, raw: str) -> None:
        self.token_encrypted = encrypt(raw) if raw else ""

    def token(self) -> str:
        return decrypt(self.token_encrypted) if self.token_encrypted else ""

    @property
    def where(self) -> str:
        """What the page shows: the URL, or the stdio command's name."""
        return self.url if self.transport == self.Transport.HTTP else f"stdio: {self.command}"

    def tool_list(self) -> list[dict[str, Any]]:
        return list(self.tools or [])
