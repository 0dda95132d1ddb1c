from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from accounts.admin import ProductPermissionAdmin

from .models import McpServer
from .names import server_name_problem


class McpServerAdminForm(forms.ModelForm):
    """The token is write-only: typed to set it, left empty to keep it; never shown."""

    token = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False),
                            help_text="a bearer token, sent as Authorization: Bearer; empty keeps the stored one")
    remove_token = forms.BooleanField(required=False)

    class Meta:
        model = McpServer
        fields = ("name", "transport", "url", "command", "chat_enabled", "api_enabled")

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        problem = server_name_problem(name)
        if problem:
            raise forms.ValidationError(problem)
        return str(name)


@admin.register(McpServer)
class McpServerAdmin(ProductPermissionAdmin):
    """Saving here marks the server Connecting; the check loop connects within seconds."""

    permission = "accounts.manage_mcp"
    form = McpServerAdminForm
    list_display = ("name", "where", "status", "chat_enabled", "api_enabled", "tool_count", "checked_at")
    list_filter = ("status", "chat_enabled", "api_enabled")
    readonly_fields = ("status", "last_error", "tools", "checked_at")

    @admin.display(description="tools")
    def tool_count(self, obj: McpServer) -> int:
        return len(obj.tool_list())

    def save_model(self, request: HttpRequest, obj: McpServer, form: Any, change: bool) -> None:
        if form.cleaned_data.get("remove_token"):
            obj.set_token("")
        elif form.cleaned_data.get("token"):
            obj.set_token(form.cleaned_data["token"])
        if not change or form.changed_data:
            obj.status, obj.checked_at = McpServer.Status.CONNECTING, None
        super().save_model(request, obj, form, change)
