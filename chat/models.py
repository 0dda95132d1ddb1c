"""OptimaChat's conversations: stored on the server, private to the user who made them."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class Conversation(models.Model):
    class Status(models.TextChoices):
        IDLE = "idle", "Idle"
        RUNNING = "running", "Running"
        ERROR = "error", "Error"

    # Not a counter: a conversation's address says nothing about how many others exist.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    class TitleSource(models.TextChoices):
        FALLBACK = "fallback", "The first words of the first message"
        MODEL = "model", "Written by the model"
        USER = "user", "Given by the user"

    title = models.CharField(max_length=200, blank=True)
    # The model's title replaces only the fallback; a name the user gave is never overwritten.
    title_source = models.CharField(max_length=8, choices=TitleSource.choices, default=TitleSource.FALLBACK)
    model_id = models.CharField(max_length=200, blank=True)
    system_prompt = models.TextField(blank=True, default=DEFAULT_SYSTEM_PROMPT)
    temperature = models.FloatField(default=0.7)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.IDLE)
    # MCP tools this conversation uses: server names (all their tools) or offered tool names (<server>_<tool>).
    mcp_tools = models.JSONField(default=list, blank=True)
    # How many times the user has spoken: the number of user messages, kept with each one added.
    turn_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    # The newest activity (a message, a rename): conversations are listed newest first by it.
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["user", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or str(self.id)


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"

    class Status(models.TextChoices):
        COMPLETE = "complete", "Complete"
        STOPPED = "stopped", "Stopped by the user"
        ERROR = "error", "Ended by an error"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.COMPLETE)
    error = models.TextField(blank=True, help_text="what ended the reply early; the partial text is kept")
    model_id = models.CharField(max_length=200, blank=True)
    # The MCP tool calls the gateway made while writing this reply, with their inputs and outputs.
    tool_calls = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]


class ChatPreferences(models.Model):
    """A user's own OptimaChat settings, the same on every device."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, primary_key=True,
                                related_name="chat_preferences")
    # Thinking and tool blocks stay open after a reply finishes (by default they fold away).
    expand_blocks = models.BooleanField(default=False)
