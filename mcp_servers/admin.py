from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin
from django.http import HttpRequest

from accounts.admin import ProductPermissionAdmin

from .models import McpServer
from .services import McpServerInvalid, ServerInput, server_input_check


class McpServerAdminForm(forms.ModelForm):
    """The token is write-only: typed to set it, left empty to keep it; never shown."""

    token = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False),
                            help_text="a bearer token, sent as Authorization: Bearer; empty keeps the stored one")
    remove_token = forms.BooleanField(required=False)

    class Meta:
        model = McpServer
        fields = ("name", "transport", "url", "command", "chat_enabled", "api_enabled")

    def clean(self) -> dict[str, Any]:
        """The same checks as the MCP servers page (mcp_servers/services.py): name, URL, stdio allowlist."""
        data = super().clean() or {}
        try:
            async_to_sync(server_input_check)(ServerInput(
                name=data.get("name") or "", transport=data.get("transport") or McpServer.Transport.HTTP,
                url=data.get("url") or "", command=data.get("command") or ""), pk=self.instance.pk)
        except McpServerInvalid as exc:
            field = exc.field if exc.field in self.fields else None
            self.add_error(field, str(exc))
        return data


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
