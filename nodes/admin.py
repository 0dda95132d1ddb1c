from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from accounts.admin import ProductPermissionAdmin

from .models import Executor, Node


class ExecutorInline(admin.TabularInline):
    model = Executor
    extra = 0
    can_delete = False
    fields = ("model_id", "state", "enabled", "quantization", "n_ctx", "replicas", "error")
    readonly_fields = fields


@admin.register(Node)
class NodeAdmin(ProductPermissionAdmin):
    permission = "accounts.manage_nodes"
    list_display = ("name", "connected", "activated", "address", "version", "last_seen")
    list_filter = ("connected", "activated")
    readonly_fields = ("node_id", "address", "version", "connected", "channel_name", "hardware", "metrics",
                       "last_seen", "last_error", "created_at")
    inlines = [ExecutorInline]


@admin.register(Executor)
class ExecutorAdmin(ProductPermissionAdmin):
    """Read-only here: settings go through the executors pages or /optima/v1/executors, which reach the node."""

    permission = "accounts.manage_executors"
    list_display = ("model_id", "node", "state", "enabled", "quantization", "parameter_count", "n_ctx", "replicas")
    list_filter = ("state", "enabled", "embedding")
    exclude = ("upstream_key_encrypted",)
    readonly_fields = [f.name for f in Executor._meta.fields if f.name != "upstream_key_encrypted"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
