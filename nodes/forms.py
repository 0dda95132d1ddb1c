"""Forms of the executors pages. Local settings are checked again by the node (ExecutorSettings), the one authority."""

from __future__ import annotations

from typing import Any

from django import forms

from node_agent.protocol import MODEL_ID_MAX_LENGTH, MODEL_ID_PATTERN
from nodes.models import Executor

_EMBEDDING_CHOICES = [("", "by folder"), ("true", "embeddings only"), ("false", "chat")]


class ExecutorSettingsForm(forms.Form):
    enabled = forms.BooleanField(required=False, help_text="runs now and after the node restarts")
    alias = forms.CharField(required=False, max_length=200, label="Public model id",
                            help_text="empty: from the file name")
    description = forms.CharField(required=False, max_length=1000, widget=forms.Textarea(attrs={"rows": 2}),
                                  help_text="empty: from the GGUF header")
    n_ctx = forms.IntegerField(required=False, min_value=0, label="Context window",
                               help_text="tokens; empty or 0: the model's own, as free memory allows")
    n_gpu_layers = forms.IntegerField(required=False, min_value=-1, label="GPU layers",
                                      help_text="empty: all where a GPU exists, else none; -1: all")
    threads = forms.IntegerField(required=False, min_value=0, help_text="empty or 0: the node's default")
    replicas = forms.IntegerField(min_value=1, max_value=16, initial=1,
                                  help_text="processes sharing the weights, each with its own key-value cache")
    parallel = forms.IntegerField(required=False, min_value=0, max_value=64, initial=0, label="Parallel requests",
                                  help_text="decoded together by each process, each with a context window of "
                                            "its own; empty or 0: up to 8, as free memory allows")
    chat_format = forms.CharField(required=False, max_length=40, help_text="e.g. chatml, gemma; empty: the "
                                                                         "model's own template")
    embedding = forms.ChoiceField(required=False, choices=_EMBEDDING_CHOICES, label="Mode")
    max_tokens = forms.IntegerField(required=False, min_value=0, label="Max tokens per reply",
                                    help_text="empty or 0: no cap beyond the context window")

    @classmethod
    def for_executor(cls, executor: Executor, data: Any = None) -> ExecutorSettingsForm:
        settings = dict(executor.settings or {})
        embedding = settings.get("embedding")
        settings["embedding"] = "" if embedding is None else str(embedding).lower()
        return cls(data, initial=settings)

    def changes(self) -> dict[str, Any]:
        """The settings as the node takes them: only what differs from the form's initial values."""
        data = dict(self.cleaned_data)
        for name in ("n_ctx", "threads", "max_tokens", "parallel"):
            data[name] = data[name] or 0
        data["embedding"] = data["embedding"] or ""
        changed = {k: v for k, v in data.items() if v != self.initial.get(k, self.fields[k].initial)}
        if "embedding" in changed:
            changed["embedding"] = {"": None, "true": True, "false": False}[changed["embedding"]]
        return changed


class RemoteUpstreamForm(forms.Form):
    name = forms.CharField(max_length=200)
    model_id = forms.RegexField(regex=MODEL_ID_PATTERN, max_length=MODEL_ID_MAX_LENGTH, label="Public model id")
    base_url = forms.URLField(max_length=500, label="Base URL", assume_scheme="https",
                              help_text="e.g. https://api.example.com/v1")
    upstream_model = forms.CharField(required=False, max_length=200, label="Upstream model",
                                     help_text="empty: the public model id")
    api_key = forms.CharField(required=False, max_length=4096, label="API key",
                              widget=forms.PasswordInput(render_value=False),
                              help_text="stored encrypted, never shown again")
    description = forms.CharField(required=False, max_length=1000)
    embedding = forms.BooleanField(required=False, label="Embeddings only")
    enabled = forms.BooleanField(required=False, initial=True)


class RemoteUpstreamUpdateForm(RemoteUpstreamForm):
    # Django removes an inherited form field this way; django-stubs types the attribute as a Field.
    name = None  # type: ignore[assignment]
    api_key = forms.CharField(required=False, max_length=4096, label="API key",
                              widget=forms.PasswordInput(render_value=False), help_text="empty: keep the stored key")

    def changes(self) -> dict[str, Any]:
        data = dict(self.cleaned_data)
        if not data["api_key"]:
            del data["api_key"]
        return data


class NewNodeForm(forms.Form):
    name = forms.CharField(max_length=100)
    host = forms.CharField(max_length=255, label="Address", help_text="host name or IP address of the node")
    port = forms.IntegerField(min_value=1, max_value=65535, initial=8022)
    # Set by the verification step, checked again at Finish: the node must still present this certificate.
    fingerprint = forms.CharField(required=False, max_length=95, widget=forms.HiddenInput)

    def clean_host(self) -> str:
        host = self.cleaned_data["host"].strip()
        if not host or any(c in host for c in "/ ?#@"):
            raise forms.ValidationError("Enter a host name or an IP address, without scheme or path.")
        return host
