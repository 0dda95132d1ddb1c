from django.contrib import admin

from accounts.admin import ProductPermissionAdmin

from .models import Executor, Node


class ExecutorInline(admin.TabularInline):
    model = Executor
    extra = 0
    can_delete = False
    fields = ("model_id", "state", "quantization", "n_ctx", "error")
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
    permission = "accounts.manage_executors"
    list_display = ("model_id", "node", "state", "quantization", "parameter_count", "n_ctx")
    list_filter = ("state",)
    readonly_fields = [f.name for f in Executor._meta.fields]
