from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.contrib.auth.password_validation import password_validators_help_text_html, validate_password
from django.core.exceptions import ValidationError

from .models import SCOPE_INFERENCE, SCOPES, User


class UserCreateForm(forms.Form):
    first_name = forms.CharField(max_length=150, required=False)
    last_name = forms.CharField(max_length=150, required=False)
    username = forms.CharField(max_length=150)
    password = forms.CharField(widget=forms.PasswordInput(render_value=False), min_length=8,
                               help_text=password_validators_help_text_html())
    user_type = forms.ChoiceField(label="Type", choices=User.Type.choices, initial=User.Type.USER)

    def clean_username(self) -> str:
        username = self.cleaned_data["username"]
        if User.objects.filter(username__iexact=username).exists():
            raise ValidationError("A user with that username exists already.")
        return username

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("password") and data.get("username"):
            try:
                validate_password(data["password"], User(username=data["username"],
                                                         first_name=data.get("first_name", ""),
                                                         last_name=data.get("last_name", "")))
            except ValidationError as exc:
                self.add_error("password", exc)
        return data


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100)
    owner = forms.ModelChoiceField(queryset=User.objects.filter(is_active=True).order_by("username"),
                                   required=False, help_text="the key acts for this user")
    expires_at = forms.DateTimeField(required=False, label="Expires (UTC)",
                                     widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    allowed_models = forms.CharField(required=False, label="Models",
                                     help_text="model ids separated by commas; empty means all")
    allowed_mcp_servers = forms.CharField(required=False, label="MCP servers",
                                          help_text="MCP server names separated by commas; empty means all "
                                                    "open to the API")
    default_mcp_servers = forms.CharField(required=False, label="Default MCP servers",
                                          help_text="used by requests that name none; empty means none")
    requests_per_minute = forms.IntegerField(required=False, min_value=1)
    tokens_per_minute = forms.IntegerField(required=False, min_value=1)
    token_budget = forms.IntegerField(required=False, min_value=1, label="Token budget")
    budget_period = forms.ChoiceField(choices=[("day", "per day"), ("month", "per month")], initial="day")
    scopes = forms.MultipleChoiceField(choices=SCOPES, initial=[SCOPE_INFERENCE], required=False,
                                       widget=forms.CheckboxSelectMultiple,
                                       help_text="inference: /v1; conversations: the owner's OptimaChat "
                                                 "conversations; management: executors, as the owner may")

    def clean_scopes(self) -> list[str]:
        return self.cleaned_data["scopes"] or [SCOPE_INFERENCE]  # none ticked: the default, not a useless key

    def clean_allowed_models(self) -> list[str]:
        return [m.strip() for m in self.cleaned_data["allowed_models"].split(",") if m.strip()]

    def clean_allowed_mcp_servers(self) -> list[str]:
        return [m.strip() for m in self.cleaned_data["allowed_mcp_servers"].split(",") if m.strip()]

    def clean_default_mcp_servers(self) -> list[str]:
        return [m.strip() for m in self.cleaned_data["default_mcp_servers"].split(",") if m.strip()]

    def clean_expires_at(self) -> datetime | None:
        return self.cleaned_data["expires_at"]
